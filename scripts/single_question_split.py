#!/usr/bin/env python
"""Write a synthetic split with one question per record, of one kind: for diagnosing a question type alone.

The bundled model answers the relative-position questions ("Is the A left or right of the B?") at chance
(README, "The bundled model"). Training a model on one kind of question at a time says which part fails:

- ``--kind position``: every pair question the split's records ask (their ``qa`` entries of type
  ``position``), each as its own ``<image>`` record; with ``--asked-only``, only the turn an evaluation asks
  (the last, as ``fastvlm eval`` does), for validation and test splits;
- ``--kind half``: ``--per-record`` one-object questions per record, "Is the A left or right of the middle of the
  image?" (made by ``scripts/add_relation_turns.py``'s ``relation_turns``), answerable only where the object
  lies clearly inside one half.

Records keep ``image``, ``scene`` and a one-entry ``qa`` (and ``question_type`` for the pairs), so
``fastvlm.data.synth.validate_record`` re-derives every answer and ``fastvlm eval --task synth`` scores them.

  python scripts/single_question_split.py --data data/synth/train.json --out pos_train.json --kind position
  python scripts/single_question_split.py --data data/synth/test.json --out pos_test.json --kind position --asked-only
  python scripts/single_question_split.py --data data/synth/train.json --out half_train.json --kind half
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from add_relation_turns import relation_turns, turn_qa

from fastvlm.data.synth import load_split

KINDS = ("position", "half")


def single(record: dict[str, Any], rid: str, qa: dict[str, Any]) -> dict[str, Any]:
    """One record asking the question of `qa` (a `qa` entry) about `record`'s image."""
    out = {"id": rid, "image": record["image"],
           "conversations": [{"from": "human", "value": "<image>\n" + qa["question"]},
                             {"from": "gpt", "value": qa["answer"]}],
           "answer": qa["answer"], "qa": [qa], "scene": record["scene"]}
    if qa["question_type"] != "half":  # a training-only type: named in `qa` (which the evaluation reads), not here
        out["question_type"] = qa["question_type"]
    return out


def split_records(records: list[dict[str, Any]], kind: str, *, asked_only: bool = False, per_record: int = 1,
                  seed: int = 0) -> list[dict[str, Any]]:
    """The one-question records of `kind` that `records` (a synthetic split, with scenes) give."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    rng = random.Random(seed)
    out = []
    for r in records:
        if "scene" not in r or "qa" not in r:
            raise ValueError(f"record {r.get('id')!r} has no 'scene' or 'qa' (not a split of `fastvlm data synth`)")
        if kind == "position":
            asked = len(r["conversations"]) // 2 - 1
            for i, q in enumerate(r["qa"]):
                if q["question_type"] == "position" and (not asked_only or i == asked):
                    out.append(single(r, f"{r['id']}-p{i}", q))
        else:
            for i, t in enumerate(relation_turns(r, rng, 0, per_record)):
                out.append(single(r, f"{r['id']}-h{i}", turn_qa(t)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a split written by `fastvlm data synth` (JSON, with scenes)")
    ap.add_argument("--out", required=True, help="where to write the one-question split (JSON)")
    ap.add_argument("--kind", required=True, choices=KINDS, help="which questions (see above)")
    ap.add_argument("--asked-only", action="store_true",
                    help="position: only the turn an evaluation asks (the last); for validation and test splits")
    ap.add_argument("--per-record", type=int, default=1, help="half: questions per record (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.per_record < 1:
        ap.error("--per-record must be >= 1")
    if Path(args.out).resolve() == Path(args.data).resolve():
        ap.error("--out must differ from --data")
    try:
        out = split_records(load_split(args.data), args.kind, asked_only=args.asked_only,
                            per_record=args.per_record, seed=args.seed)
    except ValueError as e:
        ap.error(f"{args.data}: {e}")
    Path(args.out).write_text(json.dumps(out))
    answers = Counter(r["answer"] for r in out)
    print(f"wrote {len(out)} {args.kind} records to {args.out}; answers: {dict(sorted(answers.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
