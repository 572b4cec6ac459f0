#!/usr/bin/env bash
# Session 25: the shipped bundled model evaluated on its validation split (256 px scenes) with the encoder run at
# 256 px, as trained, and at 384 px (the scenes upsampled; 36 image tokens instead of 16). This 2-core Intel Xeon.
set -euo pipefail
D=${D:-/tmp/resx}
fastvlm data synth --out "$D/data" --num-train 0 --num-val 500 --num-test 0 --image-size 256 --level basic --seed 0 --workers 2
for s in 256 384; do
  fastvlm eval --task synth --data "$D/data/val.json" --out "$D/ev$s" --dtype fp32 --device cpu --batch-size 32 \
    --image-size $s --no-progress --ttft-samples 1
  cp "$D/ev$s/summary.json" "benchmarks/results/bundled/upsampled-eval/val-$s.json"
done
