#!/usr/bin/env bash
# session 19, 18:09 UTC (first written as 18:10; the commit is at 18:09): stage 1 trains at about 1.1 steps/s here (55 min), so a stage 2 after it (60-66 min at
# 512 px) would end minutes before the session does; it does not run in this session. This waits for stage 1 and
# evaluates it, with the commands of commands.sh.
cd /work/main
while kill -0 4052 2>/dev/null; do sleep 10; done
D=runs/bundled/data; OUT=runs/s128
[ -d "$OUT/stage1/final" ] || { echo "no stage 1 final"; exit 1; }
date; echo "stage 1 done"
for S in val test; do
  OMP_NUM_THREADS=2 fastvlm eval --model "$OUT/stage1/final" --task synth --data "$D/$S.json" --out "$OUT/eval-stage1-$S" \
    --dtype fp32 --device cpu --batch-size 32 --no-progress > "$OUT/eval-stage1-$S.log" 2>&1
done
date; echo "stage 1 evaluated"
