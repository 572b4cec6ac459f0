set -euo pipefail
O=.dev/r6/deep; D=.dev/basic256
export TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
fastvlm train synth_stage1 --output-dir "$O/stage1" --set tokenizer="$D/tokenizer" --set data.train="$D/train.json" \
  --set data.val="$D/val.json" --set data.image_folder="$D" --set train.seed=43 --set data.image_size=256 \
  --set init.vision.image_size=256 --set init.vision_tower=.dev/r5/encoder-reading-seed1.safetensors \
  --set init.text.num_hidden_layers=5 --set init.text.max_window_layers=5 > "$O/stage1.log" 2>&1
fastvlm eval --model "$O/stage1/final" --task synth --data "$D/test.json" --out "$O/eval-stage1" --dtype fp32 --device cpu --batch-size 32 > "$O/eval-stage1.log" 2>&1
