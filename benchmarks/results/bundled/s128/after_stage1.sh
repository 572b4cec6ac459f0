#!/usr/bin/env bash
# session 19: the s128 commands.sh was edited while it ran (bash reads scripts by byte offset), so its
# parent shell was stopped after stage 1 had started; this runs the rest of it, as written there
cd /work/main
while kill -0 4052 2>/dev/null; do sleep 10; done
D=runs/bundled/data; OUT=runs/s128
[ -d "$OUT/stage1/final" ] || { echo "no stage 1 final"; exit 1; }
date; echo "stage 2 starts"
OMP_NUM_THREADS=2 nohup fastvlm train synth_stage2 --output-dir "$OUT/stage2" --set tokenizer="$D/tokenizer" \
    --set data.val="$D/val.json" --set data.image_folder="$D" \
    --set "data.train=[$D/train.json,$D/moved-train.json,$D/extra-train.json,$D/extra-moved-train.json]" \
    --set model="$OUT/stage1/final" --set data.num_workers=0 --set train.seed=44 --set train.max_steps=800 \
    > "$OUT/stage2.log" 2>&1 &
for S in val test; do
  OMP_NUM_THREADS=1 fastvlm eval --model "$OUT/stage1/final" --task synth --data "$D/$S.json" --out "$OUT/eval-stage1-$S" \
    --dtype fp32 --device cpu --batch-size 32 --no-progress > "$OUT/eval-stage1-$S.log" 2>&1
done
date; echo "stage 1 evaluated"
