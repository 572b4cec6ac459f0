#!/usr/bin/env bash
# The CPU benchmark behind benchmarks/results/README.md (run from the repository root).
#   bash benchmarks/run_cpu.sh            # everything below, one step after the other
#   bash benchmarks/run_cpu.sh main       # one step: profile | grouped | onednn | main | fresh | paired | decode |
#                                         #   prefetch | prefetch-fine | plan | native | prepack | hugepages | train-alloc |
#                                         #   sweep | 1.5b | 7b
# On a shared machine every timed run first waits (up to QUIET_WAIT s) for the CPUs to go idle;
# the waits and the load average are recorded in each JSON. SUFFIX names another machine's files:
#   SUFFIX=-intel bash benchmarks/run_cpu.sh main     # writes bench-0.5b-cpu-intel.json (the AMX Xeon's runs)
set -u -o pipefail
OUT=${OUT:-benchmarks/results}
QW=${QUIET_WAIT:-90}
S=${SUFFIX:-}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
step() { [ "${1}" = "${WHICH}" ] || [ "${WHICH}" = all ]; }
WHICH=${1:-all}
STEPS="profile grouped onednn main fresh paired decode prefetch prefetch-fine plan native prepack hugepages train-alloc sweep 1.5b 7b"
case " all $STEPS " in
  *" $WHICH "*) ;;
  *) echo "run_cpu.sh: unknown step '$WHICH'; steps: $STEPS (or none for all)" >&2; exit 2 ;;
esac

# where encoder time goes at 1024 px, per configuration; a 0.5B decode step, torch vs native kernels
step profile && python benchmarks/profile_encoder.py --decode --repeats 5 --quiet-wait "$QW" --out "$OUT/profile-cpu$S.json"
# the same encoders with glibc's default allocator settings (what a fresh process without tune_allocator sees)
step profile && python benchmarks/profile_encoder.py --default-allocator --configs fp32-nchw-eager fp32-fused \
    bf16-cl-eager bf16-fused --repeats 5 --quiet-wait "$QW" --out "$OUT/profile-cpu-default-allocator$S.json"

# the fused encoder's grouped convs: oneDNN's grouped kernel against depthwise convs on repeated channels
step grouped && python benchmarks/grouped_conv_ab.py --rounds 8 --out "$OUT/grouped-conv-ab-cpu$S.json"
# three oneDNN variants not taken: the ConvFFN in bands of rows, other GELUs, prepacked weights
step onednn && python benchmarks/onednn_variants.py --rounds 15 --out "$OUT/onednn-variants-cpu$S.json"

# 0.5B at 1024: exact / fast / int8 against transformers in fp32 and bf16 (in this process, and in a fresh
# process with default settings, as a user running transformers alone sees it), the paper's encoders in bf16,
# the roofline, and the accuracy of every mode against the fp32 exact path
step main && fastvlm bench --preset fastvlm-0.5b --dtypes fp32 bf16 --modes exact fast int8 --resolutions 1024 \
    --repeats 5 --transformers-fresh-process --quiet-wait "$QW" --out "$OUT" --name bench-0.5b-cpu"$S"

# only ours (fast) against transformers, in this process and in a fresh one, fp32 and bf16 (quicker than main)
step fresh && fastvlm bench --preset fastvlm-0.5b --dtypes fp32 bf16 --modes fast --resolutions 1024 --repeats 5 \
    --baselines transformers --transformers-fresh-process --no-accuracy --quiet-wait "$QW" --out "$OUT" \
    --name bench-0.5b-cpu-fresh"$S"

# bf16 fast path against the port, each decode paired with the bandwidth read right before its run
step paired && fastvlm bench --preset fastvlm-0.5b --dtypes bf16 --modes fast --resolutions 1024 --repeats 7 \
    --baselines transformers --transformers-fresh-process --no-accuracy --quiet-wait "$QW" --out "$OUT" \
    --name bench-0.5b-cpu-bf16-paired"$S"

# one decode step per CPU path (native decode layers / transformers' layers on the same kernels / PyTorch),
# interleaved, each round against its own bandwidth reading; the machine's memory state decides which of the
# committed files a run resembles (decode-step-cpu-bf16.json: fast state; -2: slow), so run it twice, apart
step decode && python benchmarks/decode_step.py --rounds 30 --out "$OUT/decode-step-cpu-bf16$S.json" \
    && python benchmarks/decode_step.py --rounds 30 --out "$OUT/decode-step-cpu-bf16-2$S.json" \
    && python benchmarks/decode_step.py --dtype fp32 --rounds 15 --out "$OUT/decode-step-cpu-fp32$S.json"
# the matrix-vector kernel against variants of it and a plain read (prints; the committed log is two runs)
step decode && python benchmarks/gemv_variants/run.py --huge-pages

# the decode kernel's software prefetch: the lean path at 0 / 1 / 4 KB ahead, interleaved, and the kernel at
# several distances on one 545 MB matrix (fastvlm.kernels.default_prefetch_bytes is chosen from these)
step prefetch && python benchmarks/decode_step.py --rounds 12 --prefetch 0 1024 4096 \
    --out "$OUT/decode-step-cpu-bf16-prefetch$S.json"
step prefetch && { echo "# python benchmarks/gemv_variants/run.py --rounds 8"; \
    python benchmarks/gemv_variants/run.py --rounds 8; } > "$OUT/gemv-variants-cpu-prefetch$S.log" 2>&1

# the same at distances between 0.5 and 2 KB (session 13: is 1 KB, the Intel default, the best of them?)
step prefetch-fine && python benchmarks/decode_step.py --rounds 16 --prefetch 512 768 1024 1536 2048 \
    --out "$OUT/decode-step-cpu-bf16-prefetch-fine$S.json"

# the lean decode layers' per-layer plans (session 12) against the layers before them (45b6670), interleaved:
# the 0.5B step, and the same 24 layers with tiny weights (per-step overhead alone)
step plan && python benchmarks/decode_ab.py --ref 45b6670 --rounds 12 --steps 4 --out "$OUT/decode-ab-plan-cpu$S.json"

# the whole bf16 decode step as one native call with a preallocated KV cache (session 20): one step of each path,
# interleaved, twice; then whole generations, the native loop against transformers' loop with the lean layers
step native && python benchmarks/decode_step.py --rounds 30 --out "$OUT/decode-step-cpu-bf16-native$S.json" \
    && python benchmarks/decode_step.py --rounds 30 --out "$OUT/decode-step-cpu-bf16-native-2$S.json" \
    && python benchmarks/decode_loop_ab.py --rounds 10 --out "$OUT/decode-loop-ab-cpu$S.json"
# the same in fp32 (where every layer was transformers' module around the matrix-vector kernel)
step native && python benchmarks/decode_step.py --dtype fp32 --rounds 15 --out "$OUT/decode-step-cpu-fp32-native$S.json" \
    && python benchmarks/decode_loop_ab.py --dtype fp32 --rounds 8 --out "$OUT/decode-loop-ab-cpu-fp32$S.json"

# the LLM prefill with oneDNN-prepacked linear weights against the plain ones (session 21; not taken: see README)
step prepack && python benchmarks/prepack_ab.py --rounds 20 --out "$OUT/prepack-ab-cpu$S.json"
# decode weights in transparent huge pages against 4 KB pages (session 22; not taken: see README)
step hugepages && python benchmarks/hugepage_ab.py --rounds 20 --model-steps 200 --out "$OUT/hugepage-ab-cpu$S.json"

# CPU training with and without glibc allocator tuning, alternated (needs the bundled model's data:
# scripts/train_bundled_model.sh step 1, or DATA=folder)
step train-alloc && python benchmarks/train_allocator_ab.py --data "${DATA:-runs/bundled/data}" \
    --out "$OUT/train-allocator-ab-cpu$S.json"

# TTFT against resolution, 256 to 2048 px (every 256; any step of 64 works: --resolutions 256:2048:64)
step sweep && fastvlm bench --preset fastvlm-0.5b --dtypes bf16 --modes exact fast --resolutions 256:2048:256 \
    --repeats 3 --baselines transformers --baseline-resolutions 512 1024 2048 --no-accuracy \
    --quiet-wait "$QW" --out "$OUT" --name bench-0.5b-sweep-cpu"$S"

# the 1.5B architecture (encoder time overtakes prefill near 1024 px in the paper)
step 1.5b && fastvlm bench --preset fastvlm-1.5b --dtypes bf16 --modes exact fast int8 --resolutions 512 1024 \
    --repeats 3 --baselines transformers --no-accuracy --quiet-wait "$QW" --out "$OUT" --name bench-1.5b-cpu"$S"

# the 7B architecture (about 15 GB in bf16; skipped with a note when memory is short)
step 7b && fastvlm bench --preset fastvlm-7b --dtypes bf16 --modes fast --resolutions 1024 --repeats 2 \
    --new-tokens 4 --baselines none --no-accuracy --quiet-wait "$QW" --out "$OUT" --name bench-7b-cpu"$S"
exit 0
