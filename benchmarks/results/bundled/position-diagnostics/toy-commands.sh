#!/usr/bin/env bash
# Position questions on ideal visual tokens (scripts/position_toy.py): the bundled LM's shape, no encoder.
# Needs the one-question splits of commands.sh (its first block) in $O. Two lanes side by side, one thread each,
# on the 2-core AMD EPYC; each run writes toy-NAME.json (arguments and the accuracy history) here.
# `bash toy-commands.sh 1` runs the first round, `2` the second (longer runs), `3` and `4` the third and fourth
# (on the 2-core Intel Xeon of session 10; the toy's runs are deterministic on one thread), `5` to `9` the fifth
# to ninth (the same Xeon, session 11), `10` the tenth (session 12), no argument all.
set -euo pipefail
ROUND=${1:-all}
D=${D:-runs/bundled/data}; O=${O:-runs/position-diagnostics}
R=benchmarks/results/bundled/position-diagnostics
toy() {  # NAME [arguments]
  OMP_NUM_THREADS=1 python scripts/position_toy.py --data "$O" --tokenizer "$D/tokenizer" --out "$R/toy-$1.json" \
    "${@:2}" > "$R/toy-$1.log" 2>&1
}
if [ "$ROUND" = all ] || [ "$ROUND" = 1 ]; then
(
  toy pairs --train pos_train --test pos_test --steps 800                       # the pair questions alone
  toy pairs-no-b --train pos_train --test pos_test:no-b --test pos_test --steps 400 --drop-b  # ... with the
                                                                                # second object hidden
  toy half-both --train half_train --reverse half_train --steps 600 \
    --test half_test --test half_test:reversed                                  # one object, named first or second
) &
(
  toy half-then-pairs --warm-start half_train --warm-steps 200 --train pos_train --steps 600 \
    --test pos_test --test half_test                                            # one-object first, then pairs
  toy half-then-all --warm-start half_train --warm-steps 200 --train pos_train --train half_train \
    --reverse half_train --steps 1000 --test pos_test --test half_test --test half_test:reversed
) &
wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 2 ]; then
(
  toy half-then-all-3000 --warm-start half_train --warm-steps 200 --train pos_train --train half_train \
    --reverse half_train --steps 3000 --eval-every 250 --test pos_test --test half_test --test half_test:reversed
) &
(
  toy pairs-6kv6 --train pos_train --test pos_test --steps 1500 --heads 6 --kv-heads 6 # 6 heads of 32, a KV head each
  # the second object hidden in half the training pairs: does a model that already reads the first object's
  # position (from the pairs with one object shown) learn to tell the two apart in the other half?
  toy pairs-half-no-b --train pos_train --drop-b 0.5 --test pos_test --test pos_test:no-b --steps 1000
) &
wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 3 ]; then
  # every position question of the test split, the asked ones (pos_test) and those of second turns
  [ -f "$O/pos_testall.json" ] || python scripts/single_question_split.py --data "$D/test.json" \
    --out "$O/pos_testall.json" --kind position
  # one of the two objects hidden in each training pair, the first or the second at random (80% of the pairs in
  # the second run; 20% keep both): the answer then follows from the shown object, with a sign that flips with
  # whether it was named first or second, so any signal needs the two names' roles told apart
  for F in 50 40; do
    toy pairs-drop-a$F-b$F --train pos_train --drop-a 0.$F --drop-b 0.$F --test pos_test --test pos_testall \
      --test pos_testall:no-a --test pos_testall:no-b --steps 800 &
  done
  wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 4 ]; then
  # ten times the steps of round 1 (the pairs alone: 68 passes over the 12,184 training pairs [corrected in session 18: 84, 8,000 x 128 / 12,184]), and the
  # curriculum of half-then-all-3000 for 8,000 steps
  toy pairs-8000 --train pos_train --test pos_test --steps 8000 --eval-every 500 &
  toy half-then-all-8000 --warm-start half_train --warm-steps 200 --train pos_train --train half_train \
    --reverse half_train --steps 8000 --eval-every 500 --test pos_test --test half_test --test half_test:reversed &
  wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 5 ]; then
  # six times the distinct pairs: every answerable pair question about the 20,000 training scenes (75,140, both
  # orders and both axes) added to the training pairs; with the shipped LM's shape, and with 6 layers of 6 heads,
  # each with its own KV head
  toy pairs-all-3000 --train pos_train --pairs-from "$D/train.json" --test pos_test --test pos_testall \
    --steps 3000 --eval-every 250 &
  toy pairs-all-6x6-3000 --train pos_train --pairs-from "$D/train.json" --test pos_test --test pos_testall \
    --layers 6 --heads 6 --kv-heads 6 --steps 3000 --eval-every 250 &  # stopped at step 1,500 (see docs/bundled-model.md)
  wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 6 ]; then
  # the visual tokens after the question, not before it: a diagnostic of the causal order (the image tokens can
  # then attend to the two names), with the training pairs, and with every pair of the training scenes
  toy pairs-image-last --train pos_train --test pos_test --test pos_testall --image-last --steps 800 &
  toy pairs-all-image-last --train pos_train --pairs-from "$D/train.json" --test pos_test --test pos_testall \
    --image-last --steps 800 &
  wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 7 ]; then
  # the pair questions alone at a third and three times the stage-1 recipe's learning rate (1e-3)
  toy pairs-lr3e-4 --train pos_train --test pos_test --lr 3e-4 --steps 1500 --eval-every 250 &
  toy pairs-lr3e-3 --train pos_train --test pos_test --lr 3e-3 --steps 1500 --eval-every 250 &
  wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 8 ]; then
  # the pair questions' tokens hold the two named objects only (no other object to tell them from): what is left
  # to learn is which of the two was named first; with the training pairs, and with every pair of the scenes
  toy pairs-only-named --train pos_train --test pos_test --only-named --steps 1500 --eval-every 250 &
  toy pairs-all-only-named --train pos_train --pairs-from "$D/train.json" --test pos_test --only-named \
    --steps 1500 --eval-every 250 &
  wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 9 ]; then
  # the two named objects only, deeper LMs: a later name can look back at the earlier one, so four layers allow
  # comparing without telling the names' roles apart (bind colour and shape, fetch, compare, read out)
  toy pairs-only-named-4-layers --train pos_train --test pos_test --only-named --layers 4 --steps 2500 \
    --eval-every 250 &
  toy pairs-only-named-6-layers --train pos_train --test pos_test --only-named --layers 6 --steps 1500 \
    --eval-every 250 &
  wait
fi
if [ "$ROUND" = all ] || [ "$ROUND" = 10 ]; then
  # a curriculum: the second object of each training pair moved towards the middle of the image in the tokens,
  # all the way at step 0 and not at all from step 800 on; tested on every answerable pair of the 1,000 test
  # scenes (3,682) besides the 135 the evaluation asks
  [ -f "$O/pairs_testscenes.json" ] || python scripts/moved_pair_split.py --data "$D" --split test --all-pairs \
    --out "$O/pairs_testscenes.json"
  # answers kept (the true ones): only the second object's coordinate in the tokens is scaled
  toy pairs-centre-b-800 --train pos_train --test pos_test --test pairs_testscenes --centre-b 800 \
    --centre-b-answers kept --steps 2000
fi
