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
stage1() {  # SUFFIX [stage-1 arguments]; THREADS=1 for two runs side by side
  OMP_NUM_THREADS=${THREADS:-2} fastvlm train synth_stage1 --output-dir "$OUT/stage1$1" "${data[@]}" \
    --set init.vision.inference_mode=true --set init.vision_tower=fastvlm/assets/fastvlm-synth "${@:2}"
}
stage2() {  # FROM-SUFFIX SUFFIX [stage-2 arguments]: stage 2 from stage1FROM-SUFFIX's export
  OMP_NUM_THREADS=2 fastvlm train synth_stage2 --output-dir "$OUT/stage2$2" "${data[@]}" \
    --set model="$OUT/stage1$1/final" --set data.num_workers=0 "${@:3}"
}
keep() {  # STAGE...: copy the runs' files and evaluate each on the validation and test splits
  for STAGE in "$@"; do
    cp "$OUT/$STAGE/metrics.jsonl" "$R/$STAGE-metrics.jsonl"; cp "$OUT/$STAGE/summary.json" "$R/$STAGE-summary.json"
    for S in val test; do
      fastvlm eval --model "$OUT/$STAGE/final" --task synth --data "$D/$S.json" --out "$OUT/eval-$STAGE-$S" \
        --dtype fp32 --device cpu --batch-size 32 --no-progress
      cp "$OUT/eval-$STAGE-$S/summary.json" "$R/eval-$STAGE-$S.json"
    done
  done
}
allpairs() {  # NAME:MODEL...: every answerable pair question of the test scenes (built below)
  for M in "$@"; do
    fastvlm eval --model "${M#*:}" --task synth --data "$OUT/test-all-pairs.json" --image-root "$D" \
      --out "$OUT/eval-allpairs-${M%%:*}" --dtype fp32 --device cpu --batch-size 32 --no-progress
    cp "$OUT/eval-allpairs-${M%%:*}/summary.json" "$R/eval-allpairs-${M%%:*}.json"
  done
}
run() {  # SUFFIX [stage-1 arguments]: stage 1, the recipe's stage 2 from it, their files and evaluations
  stage1 "$@"; stage2 "$1" "$1"; keep "stage1$1" "stage2$1"
}
data=(--set tokenizer="$D/tokenizer" --set "data.train=[$D/train.json,$D/moved-train.json]"
      --set data.val="$D/val.json" --set data.image_folder="$D" --set train.seed=43)
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
allpairs shipped:fastvlm/assets/fastvlm-synth stage1:"$OUT/stage1/final" stage2:"$OUT/stage2/final" \
  stage1-3600:"$OUT/stage1-3600/final" stage2-3600:"$OUT/stage2-3600/final"

# A third run (session 13), decided after the second and written here before it started. In the second run
# stage 1 gave 84.4% test / 83.2% validation and its stage 2 82.5% / 82.2%: counting was still below the shipped
# model's (82% against 90%; the original records get 62% of the steps), and both stage 2s so far lost accuracy
# from their stage 1 (the second's validation loss went from stage 1's 0.185 to 0.203 at step 100 and ended at
# 0.187; the encoder here already went through one stage 2 in the shipped model). So: stage 1 of 4,800 steps
# (the original records get about 2,980 steps' worth, against 2,400 in the shipped recipe), then two stage 2s
# from it: the recipe's (-4800), and one at half its learning rates (-4800-half: LM and projector 1e-4, encoder
# 5e-5). The rule, fixed now: the run's result is the stage 2 with the higher validation accuracy (the recipe's
# on a tie); it replaces the shipped model only if that accuracy is 83.1% or more (as before: the shipped 81.6%
# plus 1.5). The test split is not looked at for the choice.
stage1 -4800 --set train.max_steps=4800
stage2 -4800 -4800
stage2 -4800 -4800-half --set optim.lr=1.0e-4 --set optim.lr_vision_tower=5.0e-5
keep stage1-4800 stage2-4800 stage2-4800-half
allpairs stage1-4800:"$OUT/stage1-4800/final" stage2-4800:"$OUT/stage2-4800/final" \
  stage2-4800-half:"$OUT/stage2-4800-half/final"

# A fourth run, written here while the third run's stage 2s were training, before any of its evaluations: the
# third run's stage 1 ended at validation loss 0.223 against 0.185 for the second run's 3,600-step stage 1 (it
# sat on a plateau at ~0.32 from step 1,400 to 2,000), so the half-learning-rate stage 2 also runs from the
# second run's stage 1 (-3600-half). The rule of the third run is widened before its results are seen: of the
# three stage 2s (-4800, -4800-half, -3600-half), the one with the highest validation accuracy (on a tie, the
# earlier listed) replaces the shipped model if that accuracy is 83.1% or more. The test split plays no part.
stage2 -3600 -3600-half --set optim.lr=1.0e-4 --set optim.lr_vision_tower=5.0e-5
keep stage2-3600-half
allpairs stage2-3600-half:"$OUT/stage2-3600-half/final"

# A fifth run (session 13), written here before it started, after the fourth: one run per setting could not tell
# the settings apart (the 4,800-step stage 1 took a worse path than the 3,600-step one with the same seed), so
# the 3,600-step setting again with a second seed (train.seed=44 for both stages; the recipe's stage 2). The
# rule as before: it replaces the shipped model if its stage 2 reaches 83.1% on the validation split.
stage1 -3600-seed44 --set train.max_steps=3600 --set train.seed=44
stage2 -3600-seed44 -3600-seed44 --set train.seed=44
keep stage1-3600-seed44 stage2-3600-seed44
allpairs stage1-3600-seed44:"$OUT/stage1-3600-seed44/final" stage2-3600-seed44:"$OUT/stage2-3600-seed44/final"

# A sixth run (session 14), written here before it started. Every stage 1 so far ends with its validation loss far
# above its training loss (3,600 steps: training 0.057 against validation 0.185 for seed 43, 0.100 against 0.244 for
# seed 44): the 32,114 records are seen 14 times and the LM fits them better than it generalises. So: twice the data,
# in the same mix. 20,000 more training scenes from the generator with --seed 1 (the generator seeds each split by
# seed and name, so they share no scene with the seed-0 validation and test splits), with their own moved pair
# questions made the same way, in DATA/extra/; the paths are rewritten relative to DATA. The 3,600-step stage 1
# (7.2 passes over the 64,342 records; "8.9 over 64,228" here before the run was a miscount) with seeds 43 and 44,
# side by side on one core each; compared with the same seeds on the original data (validation 83.2% and 67.0%
# after stage 1, mean 75.1%). Then the recipe's stage 2 from whichever of the two has the higher validation
# accuracy after stage 1 (43 on a tie), with that seed.
# The rule as before: it replaces the shipped model if its stage 2 reaches 83.1% on the validation split. The test
# split plays no part in any choice.
fastvlm data synth --out "$D/extra" --num-train 20000 --num-val 0 --num-test 0 --image-size 256 --level basic \
  --train-turns 7 --seed 1 --workers 2
python scripts/moved_pair_split.py --data "$D/extra" --split train --out "$D/extra/moved-train.json"
# (the paths are rewritten by scripts/prefix_image_paths.py; until session 16 an inline script here did the
# same, byte for byte)
for S in train moved-train; do
  python scripts/prefix_image_paths.py "$D/extra/$S.json" "$D/extra-$S.json" --prefix extra/
done
data2=(--set "data.train=[$D/train.json,$D/moved-train.json,$D/extra-train.json,$D/extra-moved-train.json]")
THREADS=1 stage1 -3600-x2 --set train.max_steps=3600 "${data2[@]}" &
THREADS=1 stage1 -3600-x2-seed44 --set train.max_steps=3600 --set train.seed=44 "${data2[@]}" &
wait
keep stage1-3600-x2 stage1-3600-x2-seed44
# Run 6 gave validation 79.4% (seed 43) and 73.8% (seed 44) after stage 1 (mean 76.6%, against 75.1% on the
# original data), so by the rule above the recipe's stage 2 runs from the seed-43 stage 1:
stage2 -3600-x2 -3600-x2 "${data2[@]}"
keep stage2-3600-x2

# A seventh run (session 14), written here before it started, while run 6's stage 2 trained. Each of run 6's stage
# 1s failed one simple question type that the other got right (seed 44 colour 68% against 100%; seed 43 existence
# 85% against 98%, on the test split; the choice below does not use the test split). Both LMs start
# from the same initialisation (init.seed=0) and differ in data order only, so their weight average (a uniform
# "model soup", scripts/average_models.py) may keep what each learned. It is evaluated on both splits; the recipe's
# stage 2 (seed 43) runs from it only if its validation accuracy beats the better stage 1's 79.4%, and that stage 2
# replaces the shipped model by the same rule (83.1% or more on the validation split).
python scripts/average_models.py "$OUT/stage1-3600-x2/final" "$OUT/stage1-3600-x2-seed44/final" \
  --out "$OUT/stage1-3600-x2-soup/final"
for S in val test; do
  fastvlm eval --model "$OUT/stage1-3600-x2-soup/final" --task synth --data "$D/$S.json" \
    --out "$OUT/eval-stage1-3600-x2-soup-$S" --dtype fp32 --device cpu --batch-size 32 --no-progress
  cp "$OUT/eval-stage1-3600-x2-soup-$S/summary.json" "$R/eval-stage1-3600-x2-soup-$S.json"
done
# only if the soup's validation accuracy is above 79.4%:
#   stage2 -3600-x2-soup -3600-x2-soup "${data2[@]}"; keep stage2-3600-x2-soup
# The soup scored 38.0% on the validation split (33.5% on the test split): the two runs are not linearly
# connected, so by the rule its stage 2 does not run. Run 6's models on every answerable test-scene pair:
allpairs stage1-3600-x2:"$OUT/stage1-3600-x2/final" stage1-3600-x2-seed44:"$OUT/stage1-3600-x2-seed44/final" \
  stage2-3600-x2:"$OUT/stage2-3600-x2/final"
# All test-scene pairs: 80.2% for run 6's seed-43 stage 1 (74.0% for the same seed on the original data), 79.4%
# for its stage 2, 50.1% for the seed-44 stage 1.

# An eighth run (session 14), written here before it started: a third seed of run 6's setting (twice the data,
# train.seed=45, two cores), so that the setting is judged by the mean of three seeds. Its recipe's stage 2 runs
# only if its stage-1 validation accuracy beats run 6's best (79.4%), and replaces the shipped model by the same
# rule (83.1% or more on the validation split).
stage1 -3600-x2-seed45 --set train.max_steps=3600 --set train.seed=45 "${data2[@]}"
keep stage1-3600-x2-seed45
allpairs stage1-3600-x2-seed45:"$OUT/stage1-3600-x2-seed45/final"
# Its stage 1 scored 80.0% on the validation split (above 79.4%; its time includes 4.7 minutes paused while CI ran),
# so by the rule its stage 2 runs:
stage2 -3600-x2-seed45 -3600-x2-seed45 --set train.seed=45 "${data2[@]}"
keep stage2-3600-x2-seed45
# Its stage 2 scored 79.0% on the validation split (81.0% on the test split): below 83.1%, nothing ships.

# The colour-shape binding breakdown docs/bundled-model.md quotes (session 14), from the test predictions kept in predictions/:
mkdir -p "$R/predictions"
for M in stage1-3600 stage1-3600-x2 stage1-3600-x2-seed44; do
  cp "$OUT/eval-$M-test/predictions.jsonl" "$R/predictions/$M-test.jsonl"
done
python scripts/binding_errors.py --split "$D/test.json" --train "$D/train.json" --out "$R/binding-errors.json" \
  stage1-3600="$R/predictions/stage1-3600-test.jsonl" stage1-3600-x2="$R/predictions/stage1-3600-x2-test.jsonl" \
  stage1-3600-x2-seed44="$R/predictions/stage1-3600-x2-seed44-test.jsonl"

# A ninth run (session 15), written here before it started: hard binding turns against the shortcut the binding
# breakdown above found (binding-errors.json: run 6's seed-43 stage 1 answered existence from the shape alone, which
# is right for 84% of the training split's existence questions; its seed-44 stage 1 named another object's colour).
# Run 6's setting (twice the data, 3,600 steps, seeds 43 and 44 side by side on one core each) with both natural
# training splits extended by scripts/add_relation_turns.py: per record up to 2 existence turns (a hard "no", whose
# colour or shape alone is in the scene, then a "yes" about an object that is there) and 1 colour turn (a shape the
# scene holds once, in scenes of two or more objects). The moved pair records stay as they are. Compared with run 6's
# same seeds (validation 79.4% and 73.8% after stage 1). The rule: the recipe's stage 2, on the same data, from
# whichever stage 1 has the higher validation accuracy (43 on a tie), with that seed; it replaces the shipped model
# if it reaches 83.1% on the validation split. The test split plays no part in any choice.
for S in "" extra-; do
  python scripts/add_relation_turns.py --data "$D/${S}train.json" --out "$D/${S}train-bind.json" \
    --position 0 --halves 0 --binding 2 --colour 1
done
data3=(--set "data.train=[$D/train-bind.json,$D/moved-train.json,$D/extra-train-bind.json,$D/extra-moved-train.json]")
THREADS=1 stage1 -3600-bind --set train.max_steps=3600 "${data3[@]}" &
THREADS=1 stage1 -3600-bind-seed44 --set train.max_steps=3600 --set train.seed=44 "${data3[@]}" &
wait
keep stage1-3600-bind stage1-3600-bind-seed44
# Run 9 gave validation 53.6% (seed 43) and 68.2% (seed 44) after stage 1, far below run 6's 79.4% and 73.8% for the
# same seeds, so by the rule above the recipe's stage 2 runs from the seed-44 stage 1:
stage2 -3600-bind-seed44 -3600-bind-seed44 --set train.seed=44 "${data3[@]}"
keep stage2-3600-bind-seed44
# Its stage 2 scored 68.4% on the validation split (72.5% on the test split): below 83.1%, nothing ships.
# Run 9's binding breakdown (docs/bundled-model.md), from its stage 1s' kept test predictions; --train is the extended split here:
for M in stage1-3600-bind stage1-3600-bind-seed44; do
  cp "$OUT/eval-$M-test/predictions.jsonl" "$R/predictions/$M-test.jsonl"
done
python scripts/binding_errors.py --split "$D/test.json" --train "$D/train-bind.json" --out "$R/binding-errors-bind.json" \
  stage1-3600-bind="$R/predictions/stage1-3600-bind-test.jsonl" \
  stage1-3600-bind-seed44="$R/predictions/stage1-3600-bind-seed44-test.jsonl"

# Session 16: where reading fails. The shipped model's test predictions (fastvlm eval as in `keep`), then the reading
# breakdown (binding_errors.py --reading) for it and for the best stage 1 so far (stage1-3600), into reading-errors.json.
fastvlm eval --model fastvlm/assets/fastvlm-synth --task synth --data "$D/test.json" --out "$OUT/eval-shipped-test" \
  --dtype fp32 --device cpu --batch-size 32 --no-progress
cp "$OUT/eval-shipped-test/predictions.jsonl" "$R/predictions/shipped-test.jsonl"
python scripts/binding_errors.py --split "$D/test.json" --reading --out "$R/reading-errors.json" \
  shipped="$R/predictions/shipped-test.jsonl" stage1-3600="$R/predictions/stage1-3600-test.jsonl"

# A tenth run (session 16), written here before it started. Every stage 2 so far lowered validation accuracy from
# its stage 1 (the best stage 1, -3600: 83.2%, gave 82.2% with the recipe's stage 2 and 81.2% at half its learning
# rates). Those stage 2s drew their 12,800 samples from the 32,114 records the stage 1 had seen seven times [corrected in session 18: about 14 times, 3,600 x 128 / 32,114]; this
# one draws them from the doubled data of run 6 (data2: 64,342 records, half of them new to that stage 1). Two
# seeds of the recipe's stage 2 from stage1-3600, side by side on one core each. The rule, fixed now: the one with
# the higher validation accuracy (seed 43 on a tie) replaces the shipped model if that accuracy is 83.1% or more.
# The test split plays no part in the choice.
for S in 43 44; do
  OMP_NUM_THREADS=1 fastvlm train synth_stage2 --output-dir "$OUT/stage2-3600-on-x2-seed$S" "${data[@]}" "${data2[@]}" \
    --set model="$OUT/stage1-3600/final" --set data.num_workers=0 --set train.seed=$S --no-progress &
done
wait
keep stage2-3600-on-x2-seed43 stage2-3600-on-x2-seed44
# Run 10's stage 2s scored 82.4% (seed 43) and 82.2% (seed 44) on the validation split, the rule's choice being
# seed 43: below 83.1%, nothing ships. Their validation losses, 0.167 and 0.173, are the lowest of any stage 2 so far
# (the recipe's stage 2 from the same stage 1 on its own data: 0.187). Test split, looked at after the choice:
# 83.1% and 82.9%. Each took 12.4 min of training on one core, side by side.
# Correction to run 10's note above, written after the run: "every stage 2 so far lowered validation accuracy" is not
# right. Of the nine stage 2s before run 10 in this file, six lowered it (by 0.4-2.2 points), one kept it (-4800-half,
# 75.4%), and the two from the weakest stage 1s raised it (-3600-seed44 67.0 -> 68.0, run 9 68.2 -> 68.4).

# An eleventh run (session 16), written here before it started, after run 10: on the doubled data the stage 2 from
# the best stage 1 reached the lowest validation loss of any stage 2 (0.167) and was still falling at the end
# (0.172 at step 300). So the same two stage 2s with twice the steps (800 of 32; the schedule stretched with them).
# The rule as before: the one with the higher validation accuracy (seed 43 on a tie) replaces the shipped model if
# that accuracy is 83.1% or more. The test split plays no part in the choice.
for S in 43 44; do
  OMP_NUM_THREADS=1 fastvlm train synth_stage2 --output-dir "$OUT/stage2-3600-on-x2-800-seed$S" "${data[@]}" \
    "${data2[@]}" --set model="$OUT/stage1-3600/final" --set data.num_workers=0 --set train.seed=$S \
    --set train.max_steps=800 --no-progress &
done
wait
keep stage2-3600-on-x2-800-seed43 stage2-3600-on-x2-800-seed44
# Run 11's stage 2s scored 82.0% (seed 43) and 83.8% (seed 44) on the validation split: by the rule the seed-44
# stage 2 (validation loss 0.158, the lowest so far) replaces the shipped model. Test split, looked at after the
# choice: 83.4% (seed 43) and 83.2% (seed 44; the shipped model before it: 80.9%). Each took 28 min of training on
# one core, side by side. Shipped with:
#   rm -rf fastvlm/assets/fastvlm-synth && cp -r "$OUT/stage2-3600-on-x2-800-seed44/final" fastvlm/assets/fastvlm-synth
# The reading breakdown again, with the newly shipped model (run 11, seed 44) beside the one it replaces:
cp "$OUT/eval-stage2-3600-on-x2-800-seed44-test/predictions.jsonl" "$R/predictions/stage2-3600-on-x2-800-seed44-test.jsonl"
python scripts/binding_errors.py --split "$D/test.json" --reading --out "$R/reading-errors.json" \
  shipped-until-session-16="$R/predictions/shipped-test.jsonl" stage1-3600="$R/predictions/stage1-3600-test.jsonl" \
  shipped-run11="$R/predictions/stage2-3600-on-x2-800-seed44-test.jsonl"
