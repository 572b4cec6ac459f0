#!/usr/bin/env bash
# Position questions asked alone (docs/bundled-model.md, "The bundled model"): does the small LM learn one-object positions,
# two-object comparisons, either? Every run: recipe synth_stage1 (encoder frozen, features cached, projector and
# a new 3 x 192 LM train, lr 1e-3 cosine, batches of 128), one thread each, two runs side by side on the 2-core
# AMD EPYC; evaluated in fp32 on this CPU. D is the bundled model's data (scripts/train_bundled_model.sh step 1).
set -euo pipefail
D=${D:-runs/bundled/data}; O=${O:-runs/position-diagnostics}; mkdir -p "$O"
SHIP=runs/bundled/encoder-256.safetensors            # the shipped model's encoder (variant reading-seed1)
IMGPOS=runs/bundled/encoder-image-pos.safetensors    # continued with whole-image position labels: docs/bundled-model.md,
                                                     # "Continuing the encoder's pretraining with those position labels"
q() { python scripts/single_question_split.py --data "$D/$1.json" --out "$O/$2.json" "${@:3}"; }
q train pos_train --kind position                 # 12,184 pair questions
q val pos_val --kind position                     # 77 (validation loss only)
q test pos_test --kind position --asked-only      # 135: the test split's asked position questions
q train half_train --kind half                    # 17,614 "Is the A left or right of the middle of the image?"
q val half_val --kind half                        # 445
q test half_test --kind half                      # 882
python - "$O" <<'PY'
import json, sys
o = sys.argv[1]
json.dump(json.load(open(f"{o}/pos_train.json")) + json.load(open(f"{o}/half_train.json")), open(f"{o}/posmid_train.json", "w"))
# the same one-object questions in the wording of commit 92b4457 ("in the top or bottom half": "top" and
# "bottom" are 3 and 4 tokens of the bundled tokenizer)
for split in ("train", "val", "test"):
    recs = json.load(open(f"{o}/half_{split}.json"))
    for r in recs:
        c = r["conversations"]
        c[0]["value"] = (c[0]["value"].replace(" left or right of the middle of the image?", " in the left or right half of the image?")
                         .replace(" above or below the middle of the image?", " in the top or bottom half of the image?"))
        c[1]["value"] = r["answer"] = {"above": "top", "below": "bottom"}.get(r["answer"], r["answer"])
        r["qa"][0].update(question=c[0]["value"][len("<image>\n"):], answer=r["answer"])
    json.dump(recs, open(f"{o}/tophalf_{split}.json", "w"))
PY

run() {  # NAME TRAIN STEPS [--set ...]: the model source and anything else in the extra arguments
  OMP_NUM_THREADS=${THREADS:-1} TOKENIZERS_PARALLELISM=false fastvlm train synth_stage1 --output-dir "$O/$1" \
    --set tokenizer="$D/tokenizer" --set data.train="$O/$2.json" --set data.val="$O/pos_val.json" \
    --set data.image_folder="$D" --set train.seed=43 --set train.max_steps="$3" "${@:4}"
}
ev() { fastvlm eval --model "$O/$1/final" --task synth --data "$O/$2.json" --out "$O/eval-$1-$2" --dtype fp32 --device cpu --batch-size 32; }
for E in ship imgpos; do
  ENC=$SHIP; [ $E = imgpos ] && ENC=$IMGPOS
  V=(--set init.vision_tower="$ENC")
  run pos-$E pos_train 300 "${V[@]}";              ev pos-$E pos_test     # pairs alone
  run pos1500-$E pos_train 1500 "${V[@]}"          # pairs alone, longer (stopped after step 1,000's validation)
  run half-$E tophalf_train 300 "${V[@]}" --set data.val="$O/tophalf_val.json"; ev half-$E tophalf_test
  run posmid-$E posmid_train 800 "${V[@]}";        ev posmid-$E pos_test; ev posmid-$E half_test
  # posmid continued: 1,500 more steps from its final weights (a new cosine schedule, seed 44)
  run posmid2-$E posmid_train 1500 --set init=null --set model="$O/posmid-$E/final" --set train.seed=44
  ev posmid2-$E pos_test; ev posmid2-$E half_test
done
# the same 800 steps on pairs + one-object questions with larger LMs (shipped encoder): 6 layers of the shipped
# width; 4 layers x 256 wide with 4 heads and 4 KV heads (the shipped LM shares one KV head among its 3)
V=(--set init.vision_tower="$SHIP")
run posmid-l6 posmid_train 800 "${V[@]}" --set init.text.num_hidden_layers=6 --set init.text.max_window_layers=6
run posmid-w256kv4 posmid_train 800 "${V[@]}" --set init.text.num_hidden_layers=4 --set init.text.max_window_layers=4 \
  --set init.text.hidden_size=256 --set init.text.num_attention_heads=4 --set init.text.num_key_value_heads=4 \
  --set init.text.intermediate_size=768
# and the shipped LM with RoPE base 10,000 instead of Qwen2's 1,000,000 (more rotary frequencies that turn within
# the few tokens between the two named objects); this run had both threads to itself
THREADS=2 run posmid-rope1e4 posmid_train 800 "${V[@]}" --set init.text.rope_theta=10000.0
for M in posmid-l6 posmid-w256kv4 posmid-rope1e4; do ev $M pos_test; ev $M half_test; done

# into this directory, under the names committed here
R=benchmarks/results/bundled/position-diagnostics
for m in "$O"/*/metrics.jsonl; do
  run=$(basename "$(dirname "$m")"); cp "$m" "$R/$run-metrics.jsonl"
  [ -f "$O/$run/summary.json" ] && cp "$O/$run/summary.json" "$R/$run-summary.json"
done
for e in "$O"/eval-*/; do
  e=${e%/}; name=$(basename "$e"); cp "$e/summary.json" "$R/$name.json"
  cp "$e/predictions.jsonl" "$R/predictions-${name#eval-}.jsonl"
done

# summary.json: accuracy per run and test file, per axis (by the reference word), and the last validation loss
# on the pair questions, against chance: three tokens carry labels per answer ("left", <|im_end|>, "\n"), so an
# LM that knows the two words but not which is right has a loss of ln(2) / 3 = 0.231
python - "$O" "$R" <<'PY'
import glob, json, math, os, sys
o, r = sys.argv[1], sys.argv[2]
X = {"left", "right"}
out = {"chance_val_loss": round(math.log(2) / 3, 4), "runs": {}}
for f in sorted(glob.glob(f"{r}/*-metrics.jsonl")):
    name = os.path.basename(f)[: -len("-metrics.jsonl")]
    rows = [json.loads(x) for x in open(f)]
    val = [x for x in rows if "val_loss" in x]
    run = out["runs"].setdefault(name, {})
    run["steps"] = max(x.get("step", 0) for x in rows)
    run["val_loss_by_step"] = {x["step"]: round(x["val_loss"], 4) for x in val}
for f in sorted(glob.glob(f"{r}/predictions-*.jsonl")):
    name, test = os.path.basename(f)[len("predictions-"): -len(".jsonl")].rsplit("-", 1)
    preds = [json.loads(x) for x in open(f)]
    res = {"n": len(preds), "accuracy": round(sum(p["prediction"] == p["references"][0] for p in preds) / len(preds), 4)}
    for axis, keep in (("x", lambda w: w in X), ("y", lambda w: w not in X)):
        sel = [p for p in preds if keep(p["references"][0])]
        res[f"accuracy_{axis}"] = round(sum(p["prediction"] == p["references"][0] for p in sel) / len(sel), 4)
        res[f"answers_{axis}"] = {w: sum(p["prediction"] == w for p in sel) for w in sorted({p["prediction"] for p in sel})}
    out["runs"].setdefault(name, {})[test] = res
# how far the first-named object's half alone goes: the share of training pairs whose answer it gives
pairs = json.load(open(f"{o}/pos_train.json"))
def first_half_answers(rec):
    p = rec["qa"][0]["params"]
    a = next(x for x in rec["scene"]["objects"] if [x["color"], x["shape"]] == p["a"])
    i = 0 if p["axis"] == "x" else 1
    return (a["center"][i] < rec["scene"]["image_size"] / 2) == (rec["answer"] in ("left", "above"))
out["train_pairs_answered_by_first_object_half"] = round(sum(map(first_half_answers, pairs)) / len(pairs), 4)
json.dump(out, open(f"{r}/summary.json", "w"), indent=1)
PY
