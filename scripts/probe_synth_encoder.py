#!/usr/bin/env python
"""Linear probe of a pretrained synthetic-scene encoder: what does each output token know?

Freezes the encoder written by scripts/pretrain_synth_encoder.py, encodes training and
validation images once, fits a linear per-token head on the same labels and loss the
pretraining used (colour-shape pairs, colours, shapes, words, tens/units digits of numbers;
with `--objective reading`, where in its cell each colour lies) and reports validation F1 per
label group. The pretraining log's single F1 is dominated by the many shape and colour
positives; this says whether the encoder can read.

  python scripts/probe_synth_encoder.py --data runs/bundled/data --image-size 256 \\
      --encoder runs/bundled/encoder-256.safetensors --out probe-256.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


def _pretrain_module():
    spec = importlib.util.spec_from_file_location("pretrain_synth_encoder",
                                                  os.path.join(HERE, "pretrain_synth_encoder.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `fastvlm data synth` directory")
    p.add_argument("--image-size", type=int, required=True)
    p.add_argument("--encoder", required=True, help="encoder weights from pretrain_synth_encoder.py")
    p.add_argument("--recipe", default="synth_stage1", help="recipe whose init.vision sizes the encoder")
    p.add_argument("--level", default="basic")
    p.add_argument("--objective", default="binary", choices=("binary", "reading"),
                   help="labels, loss and decision rule of the probe (scripts/pretrain_synth_encoder.py)")
    p.add_argument("--where", default=None, choices=("none", "cell", "image"),
                   help="position labels (default: cell with --objective reading, else none)")
    p.add_argument("--counts", action="store_true", help="also probe the whole image's object counts per cell")
    p.add_argument("--num-train", type=int, default=3000, help="training images for the probe (default 3000)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args()
    pse = _pretrain_module()
    from fastvlm.data.synth import LEVELS
    from fastvlm.train.build import build_model
    from fastvlm.train.recipe import load_recipe

    torch.manual_seed(a.seed)
    rec = load_recipe(a.recipe, overrides=[f"tokenizer={os.path.join(a.data, 'tokenizer')}",
                                           f"data.train={os.path.join(a.data, 'train.json')}",
                                           f"init.vision_tower={a.encoder}", f"init.vision.image_size={a.image_size}"])
    model = build_model(rec).eval()
    grid = a.image_size // 64
    labels = pse.label_space(LEVELS[a.level].words, where=a.where or ("cell" if a.objective == "reading" else "none"),
                             grid=grid, counts=a.counts)
    with open(os.path.join(a.data, "train.json")) as f:
        train = json.load(f)[:a.num_train]
    with open(os.path.join(a.data, "val.json")) as f:
        val = json.load(f)

    def encode(records, desc):
        x = pse.load_images(records, a.data, a.image_size, desc)
        with torch.no_grad():
            feats = torch.cat([model.encode_images(x[i:i + 64].float() / 255) for i in range(0, len(x), 64)])
        return feats, torch.stack([pse.targets(r["scene"], grid, labels) for r in records])

    ft, yt = encode(train, "train images")
    fv, yv = encode(val, "val images")
    objective = pse.Objective(a.objective, labels, LEVELS[a.level].words)  # a pretraining loss and decision rule
    head = nn.Linear(ft.shape[-1], objective.num_outputs)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(a.seed)
    for _ in range(a.steps):
        idx = torch.randint(len(ft), (256,), generator=g)
        loss = objective.loss(head(ft[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = objective.predict(head(fv))
    f1 = pse.group_f1(pred, yv, pse.label_groups(labels))
    result = {"encoder": a.encoder, "image_size": a.image_size, "objective": a.objective, "where": a.where,
              "counts": a.counts, "probe_train_images": len(train), "val_images": len(val), "steps": a.steps,
              "val_f1_per_group": f1}
    if a.where == "image":  # the position questions' accuracy the probed coordinates give
        result["val_position_acc"] = pse.position_accuracy(pred, [r["scene"] for r in val], grid, labels)
    if a.counts:
        result["val_count_acc"] = pse.count_accuracy(pred, [r["scene"] for r in val], labels)
    print(json.dumps(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
