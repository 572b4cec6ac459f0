#!/usr/bin/env bash
# The shipped model's recipe (scripts/train_bundled_model.sh step 9) at 512 px input, session 17. Written before the
# local runs below started.
#
# On the H200 (scripts/gpu_resolution_run.sh, commit 05abd08, log in gpu-h200/): the shipped model's encoder
# continued its reading pretraining for 600 steps of 128 at 512 px (8x8 grid, a new head, --head-steps 50, lr 1e-3,
# bf16 autocast) and, as the control, the same 600 steps at 256 px. Stage 1 of the 256 px control ran there; the
# 512 px stage 1 did not finish inside the device time (its feature cache did not finish in the first call, beside
# the other run, and took 93 s of the second; corrected after the run, the rest is as written), so it runs here, on the
# 2-core Intel Xeon, from the 512 px encoder the GPU made (runs/res512/encoder-enc512.safetensors, fused form).
# That encoder is not kept in the repository (5 MB); `OUT=runs/res512 bash scripts/gpu_resolution_run.sh` on a GPU
# makes it again (as OUT/encoder-enc512.safetensors), the same recipe, not the same bits.
#
# Chosen before the run: the candidate is the run's stage 2 if it completes in this session, else its stage 1; it
# replaces the shipped model only if its validation accuracy (500 questions) is 85.3% or more (the shipped
# model's 83.8% + 1.5, as written in moved-pairs/commands.sh).
#
# Decided at 14:12 UTC, during stage 1 (step 2,914 of 3,600) and before any evaluation of it: the stage 2 below does
# not run in session 17. Stage 1 took 13 min to cache the features and about 60 min to train on this CPU; a stage 2
# at 512 px (the encoder training, 800 steps of 32) is estimated at 40-60 min here, which with its evaluation, the
# shipping checks and CI does not fit in the session. So by the rule above the candidate is stage 1; stage 2 stays
# written here for a later session (where the rule's "candidate" would be its stage 2).
#
# Session 18 (27 Nov 2026, 14:57 UTC), written before it starts: the stage 2 below runs now, exactly as written, on
# this 2-core Intel Xeon from runs/res512/stage1/final (session 17's). It is the candidate; it replaces the shipped
# model only if its validation accuracy is 85.3% or more. Its test accuracy is reported whatever it is.
set -euo pipefail
D=${D:-runs/bundled/data}; OUT=${OUT:-runs/res512}; R=benchmarks/results/bundled/res512
data=(--set tokenizer="$D/tokenizer" --set data.val="$D/val.json" --set data.image_folder="$D")
OMP_NUM_THREADS=2 fastvlm train synth_stage1 --output-dir "$OUT/stage1" "${data[@]}" \
  --set "data.train=[$D/train.json,$D/moved-train.json]" --set train.seed=43 --set train.max_steps=3600 \
  --set data.image_size=512 --set init.vision.image_size=512 --set init.vision.inference_mode=true \
  --set init.vision_tower="$OUT/encoder-enc512.safetensors" --set data.num_workers=2
OMP_NUM_THREADS=2 fastvlm train synth_stage2 --output-dir "$OUT/stage2" "${data[@]}" \
  --set "data.train=[$D/train.json,$D/moved-train.json,$D/extra-train.json,$D/extra-moved-train.json]" \
  --set model="$OUT/stage1/final" --set data.num_workers=0 --set train.seed=44 --set train.max_steps=800
for STAGE in stage1 stage2; do
  cp "$OUT/$STAGE/metrics.jsonl" "$R/$STAGE-metrics.jsonl"; cp "$OUT/$STAGE/summary.json" "$R/$STAGE-summary.json"
  for S in val test; do
    fastvlm eval --model "$OUT/$STAGE/final" --task synth --data "$D/$S.json" --out "$OUT/eval-$STAGE-$S" \
      --dtype fp32 --device cpu --batch-size 32 --no-progress
    cp "$OUT/eval-$STAGE-$S/summary.json" "$R/eval-$STAGE-$S.json"
  done
done

# Run after the evaluations above (session 17): the resolution study's program on the two stage 1 models, the 256 px
# one being moved-pairs' stage1-3600 (same data, steps and seed, the shipped model's encoder unchanged).
python benchmarks/resolution_study.py --run 256=runs/moved/stage1-3600/final,runs/moved/eval-stage1-3600-test \
  --run 512=runs/res512/stage1/final,runs/res512/eval-stage1-test --out $R/resolution-study-stage1

# Session 18, 16:09 UTC, after the stage 2 above scored 76.4% on validation (78.5% test; nothing shipped) and before
# the run below starts. scripts/binding_errors.py on the kept test predictions (binding-and-reading-errors.json, the
# command at the end of this file) shows where the 512 px models lose existence: of the 32 "no" questions whose
# named shape is in the scene in another colour, stage 1 answers 29 wrong and stage 2 all 32 (the 256 px models: 1),
# while every other "no" question is right. They answer from the shape alone, though the 512 px encoder's per-cell
# colour-shape F1 is 0.98. A probe of that, and the candidate of this session's second run: stage 1 continued
# 1,000 steps of 128 from the 512 px stage 1 (the recipe's settings, seed 45) on the training split with
# scripts/add_relation_turns.py's hard existence turns (train-bind.json, made in moved-pairs run 9) plus the moved
# pairs. Measured: validation and test accuracy, and the same binding breakdown. It replaces the shipped model only
# at 85.3% on validation or more (not expected: it starts from 75.4%).
OMP_NUM_THREADS=2 fastvlm train synth_stage1 --output-dir "$OUT/stage1-bind-cont" "${data[@]}" \
  --set "data.train=[$D/train-bind.json,$D/moved-train.json]" --set model="$OUT/stage1/final" --set init=null \
  --set train.seed=45 --set train.max_steps=1000 --set data.num_workers=2
for S in val test; do
  fastvlm eval --model "$OUT/stage1-bind-cont/final" --task synth --data "$D/$S.json" --out "$OUT/eval-stage1-bind-cont-$S" \
    --dtype fp32 --device cpu --batch-size 32 --no-progress
  cp "$OUT/eval-stage1-bind-cont-$S/summary.json" "$R/eval-stage1-bind-cont-$S.json"
done
cp "$OUT/stage1-bind-cont/metrics.jsonl" "$R/stage1-bind-cont-metrics.jsonl"
cp "$OUT/stage1-bind-cont/summary.json" "$R/stage1-bind-cont-summary.json"

# The binding and reading breakdown (binding-and-reading-errors.json) of the 512 px models' kept test predictions
# beside the 256 px ones they are compared with (moved-pairs' stage1-3600 and the shipped model):
M=benchmarks/results/bundled/moved-pairs
cp "$OUT/eval-stage1-test/predictions.jsonl" "$R/predictions/stage1-512-test.jsonl"
cp "$OUT/eval-stage2-test/predictions.jsonl" "$R/predictions/stage2-512-test.jsonl"
cp "$OUT/eval-stage1-bind-cont-test/predictions.jsonl" "$R/predictions/stage1-bind-cont-512-test.jsonl"
python scripts/binding_errors.py --split "$D/test.json" --reading --out "$R/binding-and-reading-errors.json" \
  shipped-256="$M/predictions/stage2-3600-on-x2-800-seed44-test.jsonl" stage1-256="$M/predictions/stage1-3600-test.jsonl" \
  stage1-512="$R/predictions/stage1-512-test.jsonl" stage2-512="$R/predictions/stage2-512-test.jsonl" \
  stage1-bind-cont-512="$R/predictions/stage1-bind-cont-512-test.jsonl"
# Session 18's second run (stage1-bind-cont, above) scored 75.8% on validation (79.7% test): nothing ships. Its hard
# existence questions: 31 of 32 still wrong; shape questions: 39 wrong, all naming another object's shape.
