#!/usr/bin/env bash
# GPU half of the benchmark (run on a CUDA machine from the repository root):
#   bash benchmarks/run_gpu.sh small    # CUDA checks of the fast paths + the 0.5B architecture (+ compile)
#   bash benchmarks/run_gpu.sh large    # the 1.5B and 7B architectures
#   bash benchmarks/run_gpu.sh check    # one short lease (~9 min): CUDA tests, the 0.5B bench at 512-2048 px
#                                       # with CUDA graphs, the encoder's per-option A/B and a TTFT profile
# Results go to $OUT (default benchmarks/results), named after the GPU (e.g. bench-0.5b-h100.json).
# Each step has its own time limit, so one slow step cannot take the others' results with it.
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
GPU=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA','').split()[0].lower())")
BENCH="python3 -m fastvlm.cli bench --device cuda --out $OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, timm; print('torch', torch.__version__, '| transformers', transformers.__version__, '| timm', timm.__version__)"

case "${1:-small}" in
small)
  timeout 150 python3 -m pytest tests/test_fast_paths.py -q -k cuda -p no:cacheprovider 2>&1 | tee "$OUT/gpu-tests-$GPU.log"
  timeout 330 $BENCH --preset fastvlm-0.5b --dtypes fp32 bf16 fp16 --modes exact fast \
      --resolutions 256 512 768 1024 1536 2048 --baseline-dtypes bf16 --name "bench-0.5b-$GPU"
  timeout 100 $BENCH --preset fastvlm-0.5b --dtypes bf16 --modes exact fast compile --resolutions 1024 \
      --baselines none --no-accuracy --no-roofline --no-plots --name "bench-0.5b-compile-$GPU"
  ;;
check)
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m "slow or not slow" -k "cuda or gpu" --durations=8 -rs \
      tests/test_fast_paths.py tests/test_graph_decode.py tests/test_bundled_model.py tests/test_train_gpu.py 2>&1 \
      | tee "$OUT/gpu-tests-$GPU.log"
  timeout 210 $BENCH --preset fastvlm-0.5b --dtypes fp32 bf16 --modes exact fast no-graphs --resolutions 512 1024 2048 \
      --baseline-dtypes bf16 --name "bench-0.5b-$GPU" 2>&1 | tee "$OUT/bench-0.5b-$GPU.log"
  # the experimental decode graphs: each generation captures its own at its third step, so decode 64 tokens
  timeout 60 $BENCH --preset fastvlm-0.5b --dtypes bf16 --modes fast graph-decode --resolutions 1024 --new-tokens 64 \
      --baselines transformers --no-accuracy --no-roofline --no-plots --name "bench-0.5b-decode-$GPU" 2>&1 | tail -12
  timeout 100 python3 benchmarks/gpu_encoder_ab.py --dtypes bf16 fp16 --compile default \
      --out "$OUT/gpu-encoder-ab-$GPU.json" 2>&1 | tail -50
  timeout 45 python3 benchmarks/profile_ttft.py --device cuda --dtype bf16 --out "$OUT/profile-ttft-$GPU.txt"
  ;;
large)
  timeout 560 $BENCH --preset fastvlm-1.5b fastvlm-7b --dtypes bf16 --modes exact fast --resolutions 512 1024 2048 \
      --baselines transformers --no-accuracy --name "bench-1.5b-7b-$GPU"
  ;;
*)
  echo "run_gpu.sh: unknown step '$1' (use small, check or large)" >&2
  exit 2
  ;;
esac
