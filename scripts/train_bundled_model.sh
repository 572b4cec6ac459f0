#!/usr/bin/env bash
# Reproduces the small model bundled in fastvlm/assets/fastvlm-synth (README "The bundled model", 256 px)
# and the 128 px model of the resolution study. Times are from the 2-core AMD EPYC used here, where the two
# resolutions' stage 1 ran side by side on one thread each (this script runs them one after the other).
#
#   bash scripts/train_bundled_model.sh [OUT]          # default OUT=runs/bundled
set -euo pipefail
OUT=${1:-runs/bundled}
D=$OUT/data
export TOKENIZERS_PARALLELISM=false

# 1. data (about 2 minutes): 20,000 training images with up to 7 questions each (one per type),
#    500 validation and 1,000 test images with one question (sometimes two), at 256x256, level
#    "basic"; then a byte-level BPE tokenizer trained on their text (492 tokens).
fastvlm data synth --out "$D" --num-train 20000 --num-val 500 --num-test 1000 --image-size 256 \
  --level basic --train-turns 7 --seed 0
fastvlm data tokenizer "$D" --out "$D/tokenizer" --vocab-size 512

common=(--set tokenizer="$D/tokenizer" --set data.train="$D/train.json" --set data.val="$D/val.json"
        --set data.image_folder="$D")
for R in 128 256; do
  # 2. pretrain the reduced FastViTHD on the scenes' ground truth (FastVLM starts from a pretrained
  #    encoder; this is the small model's stand-in for MobileCLIP). 128 px: 1,500 steps of 32 images,
  #    14 min, per-cell F1 0.84 on validation images; 256 px: 600 steps (fewer, for time), 21 min, F1 0.86.
  #    (`--objective reading --reading-images 20000`, meant to teach it to read, made it worse: README.)
  steps=$([ $R = 128 ] && echo 1500 || echo 600)
  OMP_NUM_THREADS=1 python scripts/pretrain_synth_encoder.py --data "$D" --image-size $R --steps $steps \
    --lr 5e-3 --set init.vision.layer_scale_init_value=0.01 --out "$OUT/encoder-$R.safetensors"

  #    what the frozen encoder knows, per label group (it does not read: word and digit F1 about 0.1)
  python scripts/probe_synth_encoder.py --data "$D" --image-size $R --encoder "$OUT/encoder-$R.safetensors" \
    --out "$OUT/encoder-probe-$R.json"

  # 3. stage 1: the encoder frozen (its features cached), projector and the new LM train: 1,200 steps
  #    of 128 conversations, bf16 autocast: 34 min (128 px) / 41 min (256 px) on one core each, side by side.
  OMP_NUM_THREADS=1 fastvlm train synth_stage1 --output-dir "$OUT/stage1-$R" "${common[@]}" \
    --set data.image_size=$R --set init.vision.image_size=$R --set init.vision_tower="$OUT/encoder-$R.safetensors"

  # 4. stage 2: everything trains, the encoder included, 400 steps of 32 at a lower learning rate:
  #    5 min (128 px) / 9 min (256 px) on two cores.
  OMP_NUM_THREADS=2 fastvlm train synth_stage2 --output-dir "$OUT/stage2-$R" "${common[@]}" \
    --set model="$OUT/stage1-$R/final" --set data.num_workers=0

  # 5. evaluate on the held-out test split (accuracy per question type and text size, TTFT)
  fastvlm eval --model "$OUT/stage2-$R/final" --task synth --data "$D/test.json" --out "$OUT/eval-$R" \
    --dtype fp32 --device cpu --batch-size 32
done

# 6. the resolution study (accuracy against measured TTFT, against a ViT-style encoder of the same size)
python benchmarks/resolution_study.py --run 128="$OUT/stage2-128/final,$OUT/eval-128" \
  --run 256="$OUT/stage2-256/final,$OUT/eval-256" --out benchmarks/results/resolution-study

# 7. ship the 256 px model inside the package (63.1% on the test split; 128 px: 49.2%)
rm -rf fastvlm/assets/fastvlm-synth && cp -r "$OUT/stage2-256/final" fastvlm/assets/fastvlm-synth
