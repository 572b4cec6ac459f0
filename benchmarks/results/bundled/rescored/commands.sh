# rescored-per-type.json: saved predictions scored again with the fixed per-type breakdown (README, "The
# bundled model"). D is the bundled model's data (scripts/train_bundled_model.sh step 1: the same test split).
D=${D:-data/synth}; B=benchmarks/results/bundled; S=$B/gpu-lm-sweep-h200
python scripts/rescore_synth_eval.py --data "$D/test.json" --out $B/rescored/rescored-per-type.json \
  shipped=$S/predictions-stage2-lm3-cpu.jsonl lm3-stage1=$S/predictions-stage1-lm3.jsonl \
  lm3-seed2=$S/predictions-stage1-lm3-seed2.jsonl lm256x4=$S/predictions-stage1-lm256x4.jsonl \
  lm256x6=$S/predictions-stage1-lm256x6.jsonl lm384x4=$S/predictions-stage1-lm384x4.jsonl \
  relation-curriculum=$B/relation-curriculum/predictions-stage1.jsonl \
  previous-shipped-stage2=$B/rescored/predictions-previous-shipped-stage2.jsonl \
  previous-shipped-stage1=$B/rescored/predictions-previous-shipped-stage1.jsonl
