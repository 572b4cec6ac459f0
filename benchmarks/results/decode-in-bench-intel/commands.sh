#!/usr/bin/env bash
# Session 16, 2-core Intel Xeon with AMX: the bf16 decode target (70% of each run's own bandwidth bound, paired) in
# full `fastvlm bench` runs, alternately with transformers' port in the same process and alone, twice.
set -euo pipefail
R=benchmarks/results/decode-in-bench-intel
for i in 1 2; do
  for b in transformers none; do
    fastvlm bench --preset fastvlm-0.5b --dtypes bf16 --modes fast --resolutions 1024 --repeats 5 --no-accuracy \
      --baselines $b --no-plots --out $R --name run$i-baselines-$b
  done
done
