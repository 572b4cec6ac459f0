#!/usr/bin/env python
"""Colour-shape binding errors of synthetic-split predictions (docs/bundled-model.md, "What the failing runs get wrong"), and
with --reading, reading errors by text size.

For each predictions file of `fastvlm eval --task synth` on a split: existence questions answered "no" whose named
shape is in the scene in another colour (the shortcut answers them "yes"), against all other "no" questions; and
colour questions, wrong answers that name a colour present in the scene, by the scene's object count; and shape
questions, wrong answers that name the shape of another object in the scene. With
--train, also how often answering existence from the shape alone is right on a training split. With --reading, the
word and number questions: right answers per text size, over all of them and over those whose scene holds that one
text only (nothing to choose between: reading alone); questions that name the text's colour, and how often such a
wrong answer is another text of the scene; and for wrong numbers, which digit was right.

  python scripts/binding_errors.py --split runs/bundled/data/test.json --train runs/bundled/data/train.json \\
      NAME=predictions.jsonl ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from fastvlm.data.synth import load_split
from fastvlm.eval.runner import read_predictions


def asked(record: dict) -> dict:
    """The evaluated turn's qa entry (the last one of a multi-turn record)."""
    return record["qa"][-1] if len(record["conversations"]) > 2 else record["qa"][0]


def binding_errors(records: list[dict], predictions: dict[str, str]) -> dict:
    out: Counter = Counter()
    for r in records:
        q, objs = asked(r), r["scene"]["objects"]
        p = predictions[r["id"]].strip()
        if q["question_type"] == "exists" and q["answer"] == "no":
            shape_there = any(o["shape"] == q["params"]["shape"] for o in objs)
            key = "exists_no_shape_present" if shape_there else "exists_no_other"
            out[f"{key}/n"] += 1
            out[f"{key}/wrong"] += p != q["answer"]
        elif q["question_type"] == "color":
            out["color/n"] += 1
            if p != q["answer"]:
                colours = {o["color"] for o in objs} | {t["color"] for t in r["scene"]["texts"]}
                out["color/wrong"] += 1
                out["color/wrong_in_scene"] += p in colours
                out[f"color/wrong_with_{len(objs)}_objects"] += 1
        elif q["question_type"] == "shape":
            out["shape/n"] += 1
            if p != q["answer"]:
                out["shape/wrong"] += 1
                out["shape/wrong_in_scene"] += p in {o["shape"] for o in objs}  # another object's shape
    return dict(sorted(out.items()))


def reading_errors(records: list[dict], predictions: dict[str, str]) -> dict:
    out: Counter = Counter()
    for r in records:
        q, texts = asked(r), r["scene"]["texts"]
        kind = q["question_type"]
        if kind not in ("read_word", "read_number"):
            continue
        p, a = predictions[r["id"]].strip().rstrip("."), q["answer"]
        right = p == a
        groups = [f"{kind}/size_{q['text_size']}"]
        if len(texts) == 1:
            groups.append(f"{kind}/one_text/size_{q['text_size']}")
        if q["params"].get("color"):
            groups.append(f"{kind}/colour_named")
            out[f"{kind}/colour_named/wrong_other_text"] += not right and p in {t["text"] for t in texts}
        for g in groups:
            out[f"{g}/n"] += 1
            out[f"{g}/right"] += right
        if kind == "read_number" and not right:
            tens, units = len(p) == 2 and p[0] == a[0], len(p) == 2 and p[1] == a[1]
            out[f"read_number/wrong/{'tens_right' if tens else 'units_right' if units else 'neither_right'}"] += 1
    return dict(sorted(out.items()))


def number_text_px(records: list[dict]) -> dict:
    """Median bounding box (width, height in pixels) of the scenes' numbers, per text size."""
    import statistics

    boxes: dict[int, list] = {}
    for r in records:
        for t in r["scene"]["texts"]:
            if t["kind"] == "number":
                x0, y0, x1, y1 = t["bbox"]
                boxes.setdefault(t["size"], []).append((x1 - x0, y1 - y0))
    return {f"size_{k}": [statistics.median(w for w, _ in v), statistics.median(h for _, h in v)]
            for k, v in sorted(boxes.items())}


def shape_only_rate(records: list[dict]) -> dict:
    """Existence questions of every turn of a training split, answered from the shape alone."""
    n = right = 0
    for r in records:
        shapes = {o["shape"] for o in r["scene"]["objects"]}
        for q in r["qa"]:
            if q["question_type"] == "exists":
                n += 1
                right += ("yes" if q["params"]["shape"] in shapes else "no") == q["answer"]
    return {"n": n, "right": right, "accuracy": right / n if n else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("predictions", nargs="+", help="NAME=PATH of a predictions.jsonl")
    ap.add_argument("--split", required=True, help="the split the predictions answer (JSON with scenes)")
    ap.add_argument("--train", help="a training split: also report the shape-only existence rate")
    ap.add_argument("--reading", action="store_true", help="also the reading errors (reading_errors)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    records = load_split(args.split)
    result: dict = {"split": args.split, "models": {}}
    for item in args.predictions:
        name, sep, path = item.partition("=")
        if not sep:
            ap.error(f"{item!r}: give NAME=PATH")
        if not os.path.isfile(path):
            ap.error(f"{path}: no such predictions file")
        preds = read_predictions(path)
        missing = [r["id"] for r in records if r["id"] not in preds]
        if missing:
            ap.error(f"{path}: no prediction for {len(missing)} records of {args.split} (first {missing[0]})")
        result["models"][name] = binding_errors(records, preds)
        if args.reading:
            result["models"][name]["reading"] = reading_errors(records, preds)
    if args.reading:
        result["number_text_px_median"] = number_text_px(records)
    if args.train:
        result["train_shape_only_existence"] = shape_only_rate(load_split(args.train))
    text = json.dumps(result, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
