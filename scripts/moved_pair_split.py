#!/usr/bin/env python
"""Pair questions on re-rendered scenes whose second object is moved towards the middle: a position curriculum.

The bundled model's LM does not learn "Is the A left or right of the B?" from the synthetic data: the answers
stay at chance (README, "The bundled model"). `scripts/position_toy.py --centre-b-mix` found, on ideal visual
tokens, that moving the second object towards the middle of the image for part of the training pairs lets the
LM off that plateau. This writes the image version: for each scene of a split, up to --per-scene of its
answerable pair questions (`add_relation_turns.answerable_pairs`), each on a copy of the scene where object B
is moved along the asked axis to (1 - alpha) of the way from its place to the middle of the image (alpha
drawn uniformly from [0, 1), or --alpha), re-rendered with the generator's own renderer, and the answer
derived again from the moved scene (`derive_answer`). A move that would bring B within the generator's gap
of another object or text, or an answer that becomes ambiguous, is skipped. Training only.

  python scripts/moved_pair_split.py --data runs/bundled/data --split train --out runs/bundled/data/moved.json

Images go to DATA/moved-pairs/ (paths in the JSON are relative to DATA, as the split's own), so the output
trains beside the split with one `data.image_folder`.

--all-pairs writes, instead, every answerable pair question about the split's scenes, unmoved, on the split's own
images (no rendering): a larger position test than the one question per record the split asks.

  python scripts/moved_pair_split.py --data runs/bundled/data --split test --all-pairs --out test-all-pairs.json
  fastvlm eval --task synth --data test-all-pairs.json --image-root runs/bundled/data --out runs/all-pairs
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fastvlm.data.synth import (
    SynthDataError,
    _overlaps,
    _render,
    derive_answer,
    load_split,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from add_relation_turns import answerable_pairs, moved_towards_middle, pair_records


def move_b(scene: dict[str, Any], params: dict[str, Any], alpha: float) -> dict[str, Any] | None:
    """A copy of the scene with object b moved along params' axis to (1 - alpha) of the way to the middle;
    None where it would come within the generator's gap of another item or leave the image."""
    out, b = moved_towards_middle(scene, params, alpha, whole_pixels=True)
    S = out["image_size"]
    gap = max(3, round(10 * S / 512))
    if min(b["bbox"]) < 0 or max(b["bbox"]) > S:
        return None
    # the generator placed every item at least the gap apart, so an unmoved b passes this too
    others = [o["bbox"] for o in out["objects"] if o is not b] + [t["bbox"] for t in out["texts"]]
    if any(_overlaps(b["bbox"], other, gap) for other in others):
        return None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a `fastvlm data synth` folder")
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", required=True, help="the JSON to write (images go to DATA/moved-pairs/)")
    ap.add_argument("--per-scene", type=int, default=1, help="moved pair questions per scene (default 1)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="move every b to this fraction of its distance from the middle (default: uniform in [0, 1))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--all-pairs", action="store_true",
                    help="every answerable pair question of the split's scenes, unmoved, on its own images")
    args = ap.parse_args(argv)
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        ap.error(f"--alpha must be in [0, 1], got {args.alpha}")
    data = Path(args.data)
    records = load_split(data / f"{args.split}.json")
    if args.all_pairs:
        out = pair_records(records)
        Path(args.out).write_text(json.dumps(out))
        print(f"wrote {args.out}: {len(out)} pair questions about {len(records)} scenes")
        return 0
    img_dir = data / "moved-pairs"
    img_dir.mkdir(exist_ok=True)
    rng = random.Random(f"moved-pairs/{args.seed}")
    out, skipped = [], Counter()
    for r in tqdm(records, desc="moved pairs", unit="scene"):
        pairs = answerable_pairs(r["scene"])
        rng.shuffle(pairs)
        made = 0
        for question, _, params in pairs:
            if made == args.per_scene:
                break
            alpha = rng.random() if args.alpha is None else args.alpha
            scene = move_b(r["scene"], params, alpha)
            if scene is None:
                skipped["overlap"] += 1
                continue
            try:
                answer = derive_answer(scene, "position", params)
            except SynthDataError:
                skipped["ambiguous"] += 1
                continue
            rid = f"{r['id']}-moved{made}"
            name = f"moved-pairs/{rid}.png"
            _render(scene, random.Random(f"{args.seed}/{rid}")).save(data / name)
            out.append({"id": rid, "image": name, "question_type": "position", "answer": answer, "text_size": None,
                        "scene": scene,
                        "conversations": [{"from": "human", "value": "<image>\n" + question},
                                          {"from": "gpt", "value": answer}],
                        "qa": [{"question_type": "position", "question": question, "answer": answer,
                                "text_size": None, "params": params, "alpha": round(alpha, 4)}]})
            made += 1
    Path(args.out).write_text(json.dumps(out))
    print(f"wrote {args.out}: {len(out)} moved pair questions from {len(records)} scenes "
          f"(skipped: {dict(skipped)}); answers {dict(Counter(x['qa'][0]['answer'] for x in out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
