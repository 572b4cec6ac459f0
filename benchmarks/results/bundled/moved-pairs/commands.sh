#!/usr/bin/env bash
# The bundled recipe's stage 1 and stage 2 with 12,114 extra pair questions on re-rendered training scenes whose
# second object is moved towards the middle of the image (scripts/moved_pair_split.py; alpha ~ U(0, 1), answers
# derived again), after the toy's curriculum (position-diagnostics/toy-commands.sh round 10). On the 2-core
# Intel Xeon of session 12, one run. The encoder: the shipped model's (fused, as tuned by its stage 2), frozen in
# stage 1 as in the recipe; the train-form pretrained encoder that the shipped stage 1 started from was made on
# the H200 and is not kept, so this stage 1 starts from a slightly different encoder than the shipped one did.
# Chosen before the run: the result replaces the shipped model only if its validation accuracy (500 questions)
# beats the shipped model's 81.6% by 1.5 points or more.
set -euo pipefail
D=${D:-runs/bundled/data}; OUT=${OUT:-runs/moved}
R=benchmarks/results/bundled/moved-pairs
python scripts/moved_pair_split.py --data "$D" --split train --out "$D/moved-train.json"
run() {  # SUFFIX [stage-1 arguments]: stage 1, stage 2 from it, their files and evaluations
  local S1="stage1$1" S2="stage2$1"
  local data=(--set tokenizer="$D/tokenizer" --set "data.train=[$D/train.json,$D/moved-train.json]"
              --set data.val="$D/val.json" --set data.image_folder="$D" --set train.seed=43)
  OMP_NUM_THREADS=2 fastvlm train synth_stage1 --output-dir "$OUT/$S1" "${data[@]}" \
    --set init.vision.inference_mode=true --set init.vision_tower=fastvlm/assets/fastvlm-synth "${@:2}"
  OMP_NUM_THREADS=2 fastvlm train synth_stage2 --output-dir "$OUT/$S2" "${data[@]}" --set model="$OUT/$S1/final" \
    --set data.num_workers=0
  for STAGE in "$S1" "$S2"; do
    cp "$OUT/$STAGE/metrics.jsonl" "$R/$STAGE-metrics.jsonl"; cp "$OUT/$STAGE/summary.json" "$R/$STAGE-summary.json"
    for S in val test; do
      fastvlm eval --model "$OUT/$STAGE/final" --task synth --data "$D/$S.json" --out "$OUT/eval-$STAGE-$S" \
        --dtype fp32 --device cpu --batch-size 32 --no-progress
      cp "$OUT/eval-$STAGE-$S/summary.json" "$R/eval-$STAGE-$S.json"
    done
  done
}
# the first run: the recipe's stage 1 (2,400 steps) and stage 2
run ""

# A second run, decided after the first one's stage 1 (test 79.4%: position 66.7% but counting 66.3%, against 86%
# for the shipped recipe's stage 1; the moved pairs are 38% of the records, so 2,400 steps gave the original
# records only about 1,500 steps' worth): stage 1 of 3,600 steps, then the same stage 2. The same rule, written
# before this run: ship only with validation accuracy of 83.1% or more (the shipped model's 81.6% + 1.5).
run -3600 --set train.max_steps=3600

# Every answerable pair question of the 1,000 test scenes (3,682, unmoved, on the test images): a position test
# 27 times larger than the 135 the test split asks, for the shipped model and each run's models.
python scripts/moved_pair_split.py --data "$D" --split test --all-pairs --out "$OUT/test-all-pairs.json"
for M in shipped:fastvlm/assets/fastvlm-synth stage1:"$OUT/stage1/final" stage2:"$OUT/stage2/final" \
         stage1-3600:"$OUT/stage1-3600/final" stage2-3600:"$OUT/stage2-3600/final"; do
  fastvlm eval --model "${M#*:}" --task synth --data "$OUT/test-all-pairs.json" --image-root "$D" \
    --out "$OUT/eval-allpairs-${M%%:*}" --dtype fp32 --device cpu --batch-size 32 --no-progress
  cp "$OUT/eval-allpairs-${M%%:*}/summary.json" "$R/eval-allpairs-${M%%:*}.json"
done
