#!/usr/bin/env python
"""Score saved `fastvlm eval` predictions on a synthetic test split again, with the current scoring code.

  python scripts/rescore_synth_eval.py --data data/synth/test.json --out rescored.json \\
      shipped=runs/eval/predictions.jsonl other=runs/eval2/predictions.jsonl

Written when the per-type breakdown was fixed to follow the turn that is asked (the last) rather than the
record's first turn; the overall accuracy does not change, the per-type and per-text-size columns do.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from fastvlm.eval.runner import read_predictions
from fastvlm.eval.tasks import TASKS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="the synthetic split the predictions were made on")
    ap.add_argument("--out", required=True, help="JSON file: scores and breakdown per run")
    ap.add_argument("runs", nargs="+", metavar="NAME=PREDICTIONS.jsonl")
    args = ap.parse_args(argv)
    task = TASKS["synth"]
    samples = task.load(args.data)
    out = {"data": args.data, "runs": {}}
    for run in args.runs:
        name, sep, path = run.partition("=")
        if not sep:
            ap.error(f"expected NAME=PREDICTIONS.jsonl, got {run!r}")
        if not os.path.isfile(path):
            ap.error(f"{path}: no such predictions file")
        pred = read_predictions(path)
        missing = [s.id for s in samples if s.id not in pred]
        if missing:
            ap.error(f"{path}: no prediction for {len(missing)} samples (first: {missing[0]})")
        res = task.score(samples, [pred[s.id] for s in samples])
        out["runs"][name] = {"predictions": path, "scores": res["scores"], "breakdown": res["breakdown"]}
        by_type = {k: round(100 * v["accuracy"], 1) for k, v in sorted(res["breakdown"]["question_type"].items())}
        print(f"{name}: {100 * res['scores']['accuracy']:.1f}% {by_type}")
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
