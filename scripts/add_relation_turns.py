#!/usr/bin/env python
"""Add relational training turns to a synthetic split: a curriculum for the position questions.

The bundled model answers "Is the A above or below the B?" near chance while a linear probe reads both
objects' coordinates from the encoder's tokens (docs/bundled-model.md, "The bundled model"). This writes a copy of a
training split where each record also asks

- up to ``--position N`` more pair questions of the test's own form (pairs and axes the record does not ask
  yet, either way round, so no answer can be copied from an earlier turn), and
- up to ``--halves M`` one-object questions, "Is the A above or below the middle of the image?" (or left or
  right of it), answerable only where the object lies clearly inside one half, and
- up to ``--binding K`` more existence questions of the test's own form that only a model binding each colour to
  its shape answers: alternately, within each record, a hard "no" (a colour and shape that are both in the scene,
  or one of them is, but not together) and a "yes" about an object that is there (none the record asks already);
  the "no" comes first, so ``--binding 1`` adds only hard "no" questions and an even K balances them, and
- up to ``--colour C`` more colour questions of the test's own form ("What color is the {shape}?") in scenes of two
  or more objects, about a shape the scene holds once and the record does not ask yet: the colour of another
  object in the scene is wrong there, so answering with any colour in view fails it,

every answer derived from the record's stored scene (``fastvlm.data.synth.derive_answer`` for the pairs).
The added turns go at random places after the first (which holds ``<image>``), in ``conversations`` and
in ``qa`` (as types ``position``, ``half``, ``exists`` and ``color``, so ``validate_record`` re-derives
them too); the first turn and ``question_type`` stay as they were, and the added turns are also listed under
``added_turns``. Only for training: the validation and test splits stay as generated.

Tried once for the bundled model and not kept: its stage 1 on such a split (``--position 2 --halves 2``) scored
69.4% with position at 55%, against 81.7% without the added turns (docs/bundled-model.md; benchmarks/results/bundled/
relation-curriculum/). That run asked the halves as "in the top or bottom half of the image?" (commit 92b4457);
"top" and "bottom" are three and four byte-level tokens of the bundled tokenizer, and an LM trained on such
questions alone did not learn the vertical ones in 300 steps (it answered "top" to all). They now take the pair questions'
one-token words. Asked alone (scripts/single_question_split.py), the one-object questions are learned (80-82% on
the test scenes) and the pair questions are not (chance after 1,000 steps), also when both are trained
together (benchmarks/results/bundled/position-diagnostics/).

``--binding 2 --colour 1`` was tried once too (docs/bundled-model.md, "Hard binding turns"; benchmarks/results/bundled/
moved-pairs/, run 9): both seeds' stage 1s did far worse on validation (53.6% and 68.2% against 79.4% and 73.8%
without the turns), colour and existence questions included.

  python scripts/add_relation_turns.py --data data/synth/train.json --out data/synth/train_rel.json \\
      --position 2 --halves 2
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from fastvlm.data.synth import (
    _TEMPLATES,
    COLORS,
    SHAPES,
    SynthDataError,
    _unique,
    derive_answer,
    load_split,
)

HALF_TEMPLATES = {  # answered with the pair questions' own words, each one token of the bundled tokenizer
    "x": "Is the {a} left or right of the middle of the image?",
    "y": "Is the {a} above or below the middle of the image?",
}
PAIR_TEMPLATES = {"x": "Is the {a} left or right of the {b}?", "y": "Is the {a} above or below the {b}?"}


def _pair_key(a: list[str], b: list[str], axis: str) -> tuple:
    return frozenset((tuple(a), tuple(b))), axis  # a pair asked either way round is the same question


def _asked(record: dict[str, Any]) -> set:
    return {_pair_key(q["params"]["a"], q["params"]["b"], q["params"]["axis"])
            for q in record.get("qa", []) if q.get("question_type") == "position"}


def _unique_objects(scene: dict[str, Any]) -> list[dict[str, Any]]:
    return [o for o in scene["objects"] if _unique(scene["objects"], color=o["color"], shape=o["shape"])]


def answerable_pairs(scene: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """Every pair question about the scene that `derive_answer` can answer, as (question, answer, params): all
    ordered pairs of objects unique by colour and shape, on both axes, in the order object a, axis, object b."""
    uniq, out = _unique_objects(scene), []
    for a in uniq:
        for axis in ("x", "y"):
            for b in uniq:
                if b is a:
                    continue
                params = {"a": [a["color"], a["shape"]], "b": [b["color"], b["shape"]], "axis": axis}
                try:
                    answer = derive_answer(scene, "position", params)
                except SynthDataError:
                    continue
                out.append((PAIR_TEMPLATES[axis].format(a=" ".join(params["a"]), b=" ".join(params["b"])), answer,
                            params))
    return out


def pair_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every answerable pair question about each record's scene (`answerable_pairs`), as one-question records on
    the record's own image, in the order object a, object b, axis (a stable sort of answerable_pairs' a, axis, b:
    the order in which rounds 5-9 of the position toy drew their batches)."""
    out = []
    for r in records:
        scene = r["scene"]
        pairs = answerable_pairs(scene)
        rank = {name: i for i, name in enumerate(dict.fromkeys(tuple(p["a"]) for _, _, p in pairs))}
        pairs.sort(key=lambda t: (rank[tuple(t[2]["a"])], rank[tuple(t[2]["b"])]))
        for q, answer, params in pairs:
            out.append({"id": f"{r['id']}-{'-'.join(params['a'] + params['b'])}-{params['axis']}", "image": r["image"],
                        "scene": scene, "conversations": [{"from": "human", "value": "<image>\n" + q},
                                                          {"from": "gpt", "value": answer}],
                        "answer": answer, "question_type": "position", "text_size": None,
                        "qa": [{"question_type": "position", "question": q, "answer": answer, "text_size": None,
                                "params": params}]})
    return out


def moved_towards_middle(scene: dict[str, Any], params: dict[str, Any], alpha: float, *,
                         whole_pixels: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """A copy of the scene where pair question params' object b (centre and box) is moved along the asked axis to
    (1 - alpha) of the way from its place to the middle of the image, and that object in the copy; with
    whole_pixels the shift is rounded to whole pixels (for rendering)."""
    out = copy.deepcopy(scene)
    i = 0 if params["axis"] == "x" else 1
    b = next(o for o in out["objects"] if [o["color"], o["shape"]] == list(params["b"]))
    delta = (1 - alpha) * (out["image_size"] / 2 - b["center"][i])
    if whole_pixels:
        delta = round(delta)
    b["center"] = [c + delta if k == i else c for k, c in enumerate(b["center"])]
    b["bbox"] = [c + delta if k % 2 == i else c for k, c in enumerate(b["bbox"])]
    return out, b


def binding_turns(record: dict[str, Any], rng: random.Random, n: int) -> list[dict]:
    """Up to n existence turns, hard "no" and "yes" alternately (the other kind when one runs out), about
    colour-shape combinations the record does not ask yet. A hard "no" names a colour or a shape (or both) of the
    scene's objects, never one that is there together: answering from the shape or the colour alone fails it."""
    objs = record["scene"]["objects"]
    asked = {(q["params"]["color"], q["params"]["shape"]) for q in record.get("qa", [])
             if q.get("question_type") == "exists"}
    present = {(o["color"], o["shape"]) for o in objs}
    colors, shapes = {o["color"] for o in objs}, {o["shape"] for o in objs}
    hard = [(c, s) for c in COLORS for s in SHAPES
            if (c, s) not in present and (c, s) not in asked and (c in colors or s in shapes)]
    yes = [p for p in sorted(present) if p not in asked]
    rng.shuffle(hard)
    rng.shuffle(yes)
    out = []
    for i in range(n):
        pools = (hard, yes) if i % 2 == 0 else (yes, hard)
        pool = pools[0] or pools[1]
        if not pool:
            break
        color, shape = pool.pop()
        params = {"color": color, "shape": shape}
        question = rng.choice(_TEMPLATES["exists"]).format(color=color, shape=shape)
        out.append({"question": question, "answer": derive_answer(record["scene"], "exists", params),
                    "kind": "exists", "params": params})
    return out


def colour_turns(record: dict[str, Any], rng: random.Random, n: int) -> list[dict]:
    """Up to n colour turns about shapes the scene holds exactly once, only in scenes of two or more objects (where
    another object's colour is there to be wrongly named), none the record asks already."""
    objs = record["scene"]["objects"]
    if len(objs) < 2:
        return []
    asked = {q["params"]["shape"] for q in record.get("qa", []) if q.get("question_type") == "color"}
    shapes = [s for s in sorted({o["shape"] for o in objs}) if s not in asked and _unique(objs, shape=s)]
    out = []
    for shape in rng.sample(shapes, min(n, len(shapes))):
        params = {"shape": shape}
        question = rng.choice(_TEMPLATES["color"]).format(shape=shape)
        out.append({"question": question, "answer": derive_answer(record["scene"], "color", params),
                    "kind": "color", "params": params})
    return out


def relation_turns(record: dict[str, Any], rng: random.Random, n_position: int, n_halves: int,
                   n_binding: int = 0, n_colour: int = 0) -> list[dict]:
    """The turns to add to one record: {question, answer, kind, params} dicts, every answer derived from the scene."""
    scene, asked = record["scene"], _asked(record)
    halves = []
    for a in _unique_objects(scene):
        for axis in ("x", "y"):
            half = {"a": [a["color"], a["shape"]], "axis": axis}
            try:
                halves.append((HALF_TEMPLATES[axis].format(a=f"{a['color']} {a['shape']}"),
                               derive_answer(scene, "half", half), half))
            except SynthDataError:
                pass
    # the record's own pairs never enter the (seeded) shuffle below
    pairs = [(q, answer, key, params) for q, answer, params in answerable_pairs(scene)
             if (key := _pair_key(params["a"], params["b"], params["axis"])) not in asked]
    out = []
    rng.shuffle(pairs)
    for question, answer, key, params in pairs:  # each pair once, whichever way round
        if len(out) < n_position and key not in asked:
            asked.add(key)
            out.append({"question": question, "answer": answer, "kind": "position", "params": params})
    for question, answer, params in rng.sample(halves, min(n_halves, len(halves))):
        out.append({"question": question, "answer": answer, "kind": "half", "params": params})
    if n_binding:
        out += binding_turns(record, rng, n_binding)
    if n_colour:
        out += colour_turns(record, rng, n_colour)
    return out


def turn_qa(turn: dict[str, Any]) -> dict[str, Any]:
    """The ``qa`` entry of an added turn (a `relation_turns` dict), as `fastvlm data synth` writes them."""
    return {"question_type": turn["kind"], "question": turn["question"], "answer": turn["answer"],
            "text_size": None, "params": turn["params"]}


def add_turns(record: dict[str, Any], turns: list[dict], rng: random.Random) -> dict[str, Any]:
    """The record with ``turns`` at random slots after the first, in ``conversations`` and (kept aligned
    with it, so ``validate_record`` re-derives every answer) ``qa``."""
    convs, qa = list(record["conversations"]), list(record.get("qa", []))
    for t in turns:
        k = rng.randrange(1, len(convs) // 2 + 1)  # a turn slot after the first
        convs[2 * k:2 * k] = [{"from": "human", "value": t["question"]}, {"from": "gpt", "value": t["answer"]}]
        if "qa" in record:
            qa.insert(k, turn_qa(t))
    out = dict(record, conversations=convs, added_turns=turns)
    if "qa" in record:
        out["qa"] = qa
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a synthetic training split (JSON) with its scenes")
    ap.add_argument("--out", required=True, help="where to write the extended split (JSON)")
    ap.add_argument("--position", type=int, default=2, help="extra pair questions per record (default 2)")
    ap.add_argument("--halves", type=int, default=2, help="one-object half questions per record (default 2)")
    ap.add_argument("--binding", type=int, default=0,
                    help="existence questions per record that need each colour bound to its shape (default 0)")
    ap.add_argument("--colour", type=int, default=0,
                    help="colour questions per record about a shape in a scene of two or more objects (default 0)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if min(args.position, args.halves, args.binding, args.colour) < 0:
        ap.error("--position, --halves, --binding and --colour must be >= 0")
    if Path(args.out).resolve() == Path(args.data).resolve():
        ap.error("--out must differ from --data")
    records = load_split(args.data)
    if records and "scene" not in records[0]:
        ap.error(f"{args.data}: records have no 'scene' (not a split written by `fastvlm data synth`)")
    rng = random.Random(f"relation-turns/{args.seed}")
    counts: Counter = Counter()
    out = []
    for rec in records:
        turns = relation_turns(rec, rng, args.position, args.halves, args.binding, args.colour)
        counts.update(f"{t['kind']}:{t['answer']}" for t in turns)
        out.append(add_turns(rec, turns, rng))
    Path(args.out).write_text(json.dumps(out))
    print(f"wrote {len(out)} records to {args.out}; added turns by kind and answer: {dict(sorted(counts.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
