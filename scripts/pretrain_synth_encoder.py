#!/usr/bin/env python
"""Pretrain the bundled model's reduced FastViTHD on the synthetic scenes' ground truth.

FastVLM starts from a pretrained image encoder (MobileCLIP's FastViTHD); nothing pretrained
exists for the reduced encoder of the bundled model, and trained jointly from scratch with a
random LLM it learns to look at images very slowly (a 4.6 M-parameter model trained on
51,000 images end to end still answered from the question alone). This gives it the
equivalent of that pretraining, from the scene metadata `fastvlm data synth` stores with
every record: each output token (a cell of the (res/64) x (res/64) grid; res/128 with a sixth stage)
learns which coloured shapes, words and number digits have their centre in its cell (`Objective`;
`--objective reading` adds where in the cell each object lies and learns the text by softmax).
With `--reading-images N`, N generated text-rich scenes (`generate_reading_scene`) join the
QA images so that reading gets more examples. The weights (train-time multi-branch form) then
initialise the VLM through the recipe key `init.vision_tower`.

  python scripts/pretrain_synth_encoder.py --data runs/bundled/data --image-size 256 \\
      --objective reading --reading-images 20000 --batch-size 128 --steps 914 --seed 1 --lr 5e-3 \\
      --workers 2 --set init.vision.layer_scale_init_value=0.01 --out runs/bundled/encoder-256.safetensors

It runs on a CUDA GPU when there is one (--device): the whole image set then lives on the GPU,
and the shipped encoder's 914 steps of 128 took 169 s on an H200 shared by four runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from fastvlm.data.synth import (
    COLORS,
    LEVELS,
    SHAPES,
    generate_reading_scene,
    load_split,
)

BINS = 4  # sub-cell position bins per axis


WHERE = ("none", "cell", "image")


MAX_COUNT = 4  # the synthetic scenes hold at most 4 objects


def label_space(words: tuple[str, ...], where: str = "none", grid: int = 4, counts: bool = False) -> dict[str, int]:
    """Index of every label: colour-shape pairs, colours, shapes, words, tens and units digits of
    numbers; then where the objects lie, per colour, by `where`:

    - ``cell``: which of BINS equal parts of its cell, per axis (two objects a position question
      compares often share a cell, and a cell-level label cannot tell which is left of the other);
    - ``image``: where in the whole image, as ordinal thresholds: ``xgt {colour} {b}`` holds when
      the centre lies right of b/K of the width, for b = 1 .. K-1, K = grid * BINS (``ygt``: below).
      A token's own position in the grid is not in what the LLM's attention reads from it (RoPE
      acts on queries and keys, not values), so a model that must compare two objects' positions
      needs them written into the features; as thresholds, one linear read-out gives the coordinate.

    With `counts`, every cell also learns how many objects of each colour, of each shape and in
    all the whole image holds, as thresholds ``count {what} {k}`` (at least k, k = 1 .. MAX_COUNT):
    the same in every cell, so whichever token the LLM reads, it finds the totals there.
    """
    if where not in WHERE:
        raise ValueError(f"unknown where {where!r}; choose one of {', '.join(WHERE)}")
    names = [f"{c} {s}" for c in COLORS for s in SHAPES] + [f"color {c}" for c in COLORS]
    names += [f"shape {s}" for s in SHAPES] + [f"word {w}" for w in words]
    names += [f"tens {d}" for d in range(10)] + [f"units {d}" for d in range(10)]
    if where == "cell":
        names += [f"{axis} {c} {b}" for axis in ("xbin", "ybin") for c in COLORS for b in range(BINS)]
    elif where == "image":
        names += [f"{axis} {c} {b}" for axis in ("xgt", "ygt") for c in COLORS for b in range(1, grid * BINS)]
    if counts:
        names += [f"count {w} {k}" for w in (*COLORS, *SHAPES, "all") for k in range(1, MAX_COUNT + 1)]
    return {n: i for i, n in enumerate(names)}


def label_groups(labels: dict[str, int]) -> dict[str, list[int]]:
    """Label indices per group: colour_shape, colour, shape, word, digit, where."""
    kinds = {"color": "colour", "shape": "shape", "word": "word", "tens": "digit", "units": "digit",
             "xbin": "where", "ybin": "where", "xgt": "where", "ygt": "where", "count": "count"}
    groups: dict[str, list[int]] = {}
    for name, i in labels.items():
        groups.setdefault(kinds.get(name.split(" ")[0], "colour_shape"), []).append(i)
    return groups


def group_f1(pred: torch.Tensor, target: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, float]:
    """F1 of boolean predictions against multi-hot targets, per label group."""
    out = {}
    for group, idx in groups.items():
        p, y = pred[..., idx], target[..., idx] > 0
        out[group] = round(2 * (p & y).sum().item() / max(1, p.sum().item() + y.sum().item()), 4)
    return out


OBJECTIVES = ("binary", "reading")


class Objective:
    """What the per-token head is trained on.

    ``binary`` (the shipped model's encoder): every label independent, binary cross-entropy
    with positives weighted 4x (they are rare: a few per cell), so the loss is not "always no".
    ``reading``: objects as in ``binary`` (with the `where` labels of ``label_space``, by default
    where in its cell each colour lies); text as which word, tens digit and units digit (or nothing) the cell holds,
    by softmax cross-entropy (soft targets when a cell holds several), since as binary labels a
    word is a positive in about one cell in a hundred and the encoder never left "always no".
    The head has one logit per label, plus (reading) a "nothing" logit per text group.
    """

    def __init__(self, kind: str, labels: dict[str, int], words: tuple[str, ...],
                 text_loss_weight: float = 1.0) -> None:
        if kind not in OBJECTIVES:
            raise ValueError(f"unknown objective {kind!r}; choose one of {', '.join(OBJECTIVES)}")
        self.n = len(labels)
        self.text_sets = [] if kind == "binary" else [
            [labels[f"word {w}"] for w in words], [labels[f"tens {d}"] for d in range(10)],
            [labels[f"units {d}"] for d in range(10)]]
        self.binary = torch.ones(self.n, dtype=torch.bool)
        self.binary[[i for t in self.text_sets for i in t]] = False
        self.pos_weight = torch.full((int(self.binary.sum()),), 4.0)
        self.text_loss_weight = text_loss_weight

    def to(self, device: torch.device) -> Objective:
        self.binary, self.pos_weight = self.binary.to(device), self.pos_weight.to(device)
        return self

    @property
    def num_outputs(self) -> int:
        return self.n + len(self.text_sets)

    def _class_logits(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        return torch.cat([logits[..., self.text_sets[k]], logits[..., self.n + k: self.n + k + 1]], -1)

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = nn.functional.binary_cross_entropy_with_logits(
            logits[..., :self.n][..., self.binary], y[..., self.binary], pos_weight=self.pos_weight)
        for k, idx in enumerate(self.text_sets):
            yy = y[..., idx]
            target = torch.cat([yy, (yy.sum(-1, keepdim=True) == 0).float()], -1)
            target = target / target.sum(-1, keepdim=True)
            ce = nn.functional.cross_entropy(self._class_logits(logits, k).flatten(0, -2), target.flatten(0, -2))
            out = out + self.text_loss_weight * ce / len(self.text_sets)
        return out

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        """Multi-hot predictions: binary labels where their logit is above 0; per text group, the
        argmax class unless it is "nothing"."""
        pred = logits[..., :self.n] > 0
        for k, idx in enumerate(self.text_sets):
            cls = self._class_logits(logits, k).argmax(-1)
            pred[..., idx] = nn.functional.one_hot(cls, len(idx) + 1)[..., :-1].bool()
        return pred


def targets(scene: dict, grid: int, labels: dict[str, int]) -> torch.Tensor:
    """[grid*grid, num_labels] multi-hot: what has its centre in each token's cell (row-major, as the encoder's tokens)."""
    y = torch.zeros(grid * grid, len(labels))
    size = scene["image_size"]

    def cell(x: float, yy: float) -> int:
        return min(int(yy / size * grid), grid - 1) * grid + min(int(x / size * grid), grid - 1)

    def sub_bin(v: float) -> int:  # which of BINS equal parts of its cell v falls in
        g = min(v / size * grid, grid - 1e-6)
        return min(int((g - int(g)) * BINS), BINS - 1)

    first = next(iter(COLORS))
    where = "cell" if f"xbin {first} 0" in labels else "image" if f"xgt {first} 1" in labels else "none"
    for o in scene["objects"]:
        k = cell(*o["center"])
        y[k, labels[f"{o['color']} {o['shape']}"]] = 1
        y[k, labels[f"color {o['color']}"]] = 1  # factorised too: each has many more positives to learn from
        y[k, labels[f"shape {o['shape']}"]] = 1
        if where == "cell":
            y[k, labels[f"xbin {o['color']} {sub_bin(o['center'][0])}"]] = 1
            y[k, labels[f"ybin {o['color']} {sub_bin(o['center'][1])}"]] = 1
        elif where == "image":
            for axis, v in zip(("xgt", "ygt"), o["center"]):
                b = 1
                while f"{axis} {o['color']} {b}" in labels and v > b * size / (grid * BINS):
                    y[k, labels[f"{axis} {o['color']} {b}"]] = 1
                    b += 1
    if "count all 1" in labels:
        objs = scene["objects"]
        for w in (*COLORS, *SHAPES, "all"):
            n = sum(w in ("all", o["color"], o["shape"]) for o in objs)
            for k in range(1, min(n, MAX_COUNT) + 1):
                y[:, labels[f"count {w} {k}"]] = 1
    for t in scene["texts"]:
        x0, y0, x1, y1 = t["bbox"]
        k = cell((x0 + x1) / 2, (y0 + y1) / 2)
        if t["kind"] == "word":
            key = f"word {t['text']}"
            if key in labels:
                y[k, labels[key]] = 1
        else:
            y[k, labels[f"tens {t['text'][-2]}"]] = 1
            y[k, labels[f"units {t['text'][-1]}"]] = 1
    return y


def position_accuracy(pred: torch.Tensor, scenes: list[dict], grid: int, labels: dict[str, int]) -> float:
    """With ``where="image"`` labels: the share of the position questions a scene allows (pairs of
    objects apart by the synthetic data's margin on an axis) that the predicted coordinates get
    right. An object's coordinate is the number of its colour's thresholds predicted in its cell."""
    from fastvlm.data.synth import _position_margin

    k = grid * BINS

    def coord(p: torch.Tensor, o: dict, axis: str, size: int) -> int:
        c = min(int(o["center"][1] / size * grid), grid - 1) * grid + min(int(o["center"][0] / size * grid), grid - 1)
        return sum(bool(p[c, labels[f"{axis}gt {o['color']} {b}"]]) for b in range(1, k))

    right = total = 0
    for p, sc in zip(pred, scenes):
        size, m = sc["image_size"], _position_margin(sc["image_size"])
        objs = sc["objects"]
        for i, a in enumerate(objs):
            for b in objs[i + 1:]:
                for axis, lo, hi in (("x", 0, 2), ("y", 1, 3)):
                    if a["bbox"][hi] + m <= b["bbox"][lo] or b["bbox"][hi] + m <= a["bbox"][lo]:
                        total += 1
                        right += (coord(p, a, axis, size) < coord(p, b, axis, size)) == (a["center"][lo] < b["center"][lo])
    return round(right / max(1, total), 4)


def count_accuracy(pred: torch.Tensor, scenes: list[dict], labels: dict[str, int]) -> float:
    """With ``counts`` labels: how often the count read from the predictions (thresholds held,
    by majority over the cells) equals the true count, over every colour, shape and "all" of
    every scene (mostly zeros; the count questions ask about present objects, see synth)."""
    right = total = 0
    for p, sc in zip(pred, scenes):
        for w in (*COLORS, *SHAPES, "all"):
            n = sum(w in ("all", o["color"], o["shape"]) for o in sc["objects"])
            if n == 0 and w != "all":
                continue  # absent kinds are most of the pairs and easy; the questions ask about present ones
            held = p[:, [labels[f"count {w} {k}"] for k in range(1, MAX_COUNT + 1)]].float().mean(0) > 0.5
            right += int(held.sum()) == min(n, MAX_COUNT)
            total += 1
    return round(right / max(1, total), 4)


def _to_uint8(img, size: int, first: bool) -> torch.Tensor:
    from fastvlm.processing import preprocess_image

    x = preprocess_image(img, size)
    q = torch.round(x * 255)
    if first and (q / 255 - x).abs().max() > 1e-6:
        raise ValueError("preprocessing is not k/255 valued; store floats instead")  # crosses the worker pool
    return q.to(torch.uint8)


def _pool_init() -> None:
    torch.set_num_threads(1)  # as DataLoader workers do: a forked worker must not use the parent's OpenMP pool


def _map(fn, jobs: list, workers: int, desc: str):
    """fn over jobs in order, in `workers` processes when > 1, with a progress bar."""
    from tqdm import tqdm

    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="img", dynamic_ncols=True)]
    import multiprocessing

    with multiprocessing.Pool(workers, initializer=_pool_init) as pool:
        return list(tqdm(pool.imap(fn, jobs, chunksize=64), total=len(jobs), desc=desc, unit="img",
                         dynamic_ncols=True))


def _load_one(job: tuple) -> np.ndarray:
    from fastvlm.processing import load_image

    path, size, first = job
    return _to_uint8(load_image(path), size, first).numpy()


def load_images(records: list[dict], root: str, size: int, desc: str, workers: int = 1) -> torch.Tensor:
    """uint8 [N, 3, size, size], preprocessed exactly as the VLM sees them (fastvlm.processing)."""
    arrays = _map(_load_one, [(os.path.join(root, r["image"]), size, i == 0) for i, r in enumerate(records)],
                  workers, desc)
    return torch.from_numpy(np.stack(arrays))


def _reading_one(job: tuple) -> tuple[np.ndarray, dict]:
    seed, i, data_size, size, level = job
    img, scene = generate_reading_scene(seed, i, data_size, level=level)
    return _to_uint8(img, size, i == 0).numpy(), scene


def reading_images(n: int, seed: int, data_size: int, size: int, level: str,
                   workers: int = 1) -> tuple[torch.Tensor, list[dict]]:
    """n text-rich scenes (3-6 words and numbers each, `generate_reading_scene`) rendered at the
    data's resolution and preprocessed to `size`, with their scenes: many more reading positives
    per step than the QA images (at most two texts each), where reading never took hold."""
    out = _map(_reading_one, [(seed, i, data_size, size, level) for i in range(n)], workers, "reading images")
    return torch.from_numpy(np.stack([a for a, _ in out])), [sc for _, sc in out]


def autocast(args, device: torch.device):
    """--bf16: the forward passes under bf16 autocast (weights, gradients and the optimizer stay fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()


def fit_steps(args, encoder: nn.Module, head: nn.Module, objective: Objective, X: torch.Tensor, Y: torch.Tensor,
              device: torch.device) -> int:
    """--max-seconds: time 20 forward-backward passes (after 10 of warm-up) on batches from their own
    random stream, then restore every weight and buffer (batch-norm statistics move in training
    mode), so the run that follows is exactly the run `--steps N` gives for the N it returns."""
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in (encoder, head)]
    rng = torch.random.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    g = torch.Generator().manual_seed(args.seed + 1)
    for i in range(30):
        if i == 10:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
        idx = torch.randint(0, len(X), (args.batch_size,), generator=g).to(device)
        with autocast(args, device):
            loss = objective.loss(head(encoder(X[idx].float() / 255)), Y[idx])
        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - t) / 20
    for m, state in zip((encoder, head), saved):
        m.load_state_dict(state)
        m.zero_grad(set_to_none=True)
    torch.random.set_rng_state(rng[0])  # drop-path and dropout draw from it
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    steps = max(1, min(args.steps, int(args.max_seconds / (per_step * 1.1))))
    print(f"{per_step * 1000:.1f} ms per step: {steps} steps fit in --max-seconds {args.max_seconds:g}")
    return steps


@torch.no_grad()
def small_conv_init_(encoder: nn.Module) -> nn.Module:
    """Every convolution a std-0.02 truncated normal with zero bias: FastViTHD.init_weights before session 21,
    which the shipped encoder was pretrained from (`--conv-init small`)."""
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return encoder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a `fastvlm data synth` directory (train.json, val.json, images/)")
    p.add_argument("--image-size", type=int, required=True, help="input resolution (a multiple of the encoder's stride: 64, or 128 with six stages)")
    p.add_argument("--recipe", default="synth_stage1", help="recipe whose init.vision sizes the encoder")
    p.add_argument("--level", default="basic", choices=sorted(LEVELS), help="the data's level (its word list)")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--num-train", type=int, default=None, help="use the first N training images (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reading-images", type=int, default=0,
                   help="add N generated text-rich scenes to the training images (default 0)")
    p.add_argument("--objective", default="binary", choices=OBJECTIVES,
                   help="binary: every label by BCE (the shipped model's encoder); reading: words and digits "
                        "by softmax, plus sub-cell object positions (see Objective)")
    p.add_argument("--where", default=None, choices=WHERE,
                   help="labels for where each object lies, per colour: within its cell (default with the "
                        "reading objective), in the whole image as ordinal thresholds, or none (default with "
                        "binary); see label_space")
    p.add_argument("--counts", action="store_true",
                   help="every cell also learns the whole image's object counts per colour, per shape and in all "
                        "(see label_space)")
    p.add_argument("--text-loss-weight", type=float, default=1.0,
                   help="reading objective: weight of the word and digit cross-entropy")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or mps (default auto: CUDA, else MPS, else CPU)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that load and render the images before training (default 1)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time 20 steps first, then train min(--steps, what fits in this many seconds) steps: "
                        "the same run as --steps with that number (the log records it as steps_run)")
    p.add_argument("--head-steps", type=int, default=0,
                   help="train only the new head for the first N steps: when init.vision_tower gives a pretrained "
                        "encoder, so a random head's gradients do not disturb its features (default 0)")
    p.add_argument("--conv-init", default="small", choices=("small", "reference"),
                   help="a new encoder's convolutions: small (default; std-0.02 truncated normal, zero bias, on every "
                        "conv: the init the shipped encoder was pretrained from, and in a 120-step A/B the faster "
                        "to train, benchmarks/results/bundled/init-ab/) or reference (FastViTHD's own init, as "
                        "Apple's: PyTorch's default except ConvFFN's). Ignored with init.vision_tower")
    p.add_argument("--bf16", action="store_true",
                   help="run the forward passes under bf16 autocast (fp32 weights and optimizer; default fp32)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--out", required=True, help="output .safetensors (the encoder's train-form weights)")
    args = p.parse_args()
    if args.reading_images < 0:
        p.error(f"--reading-images must be >= 0, got {args.reading_images}")
    if args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    from fastvlm.errors import FastVLMError
    from fastvlm.model import resolve_device

    try:
        device = resolve_device(args.device)
    except FastVLMError as e:
        p.error(str(e))
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    from fastvlm.kernels import tune_allocator

    tune_allocator()  # on a CPU, keep freed activations in the heap (as `fastvlm train` does)

    from safetensors.torch import save_file

    from fastvlm.train.build import build_model
    from fastvlm.train.recipe import load_recipe

    torch.manual_seed(args.seed)
    recipe = load_recipe(args.recipe, [f"tokenizer={os.path.join(args.data, 'tokenizer')}",
                                       f"data.image_size={args.image_size}", *args.set], validate=False)
    encoder = build_model(recipe).vision_tower.train()
    if args.conv_init == "small" and not recipe.init.vision_tower:
        if encoder.config.inference_mode:
            p.error("--conv-init small re-initialises a train-form encoder (it would overwrite a fused encoder's "
                    "identity-start RepMixers); with init.vision.inference_mode=true use --conv-init reference")
        small_conv_init_(encoder)
    grid = args.image_size // encoder.patch_size  # 64 for FastViTHD's five stages, 128 with a sixth
    where = args.where or ("cell" if args.objective == "reading" else "none")
    labels = label_space(LEVELS[args.level].words, where=where, grid=grid, counts=args.counts)
    train = load_split(os.path.join(args.data, "train.json"))[: args.num_train]
    val = load_split(os.path.join(args.data, "val.json"))[:200]
    X = load_images(train, args.data, args.image_size, "train images", args.workers)
    Y = torch.stack([targets(r["scene"], grid, labels) for r in train])
    if args.reading_images:
        data_size = train[0]["scene"]["image_size"]
        Xr, scenes = reading_images(args.reading_images, args.seed, data_size, args.image_size, args.level,
                                    args.workers)
        X = torch.cat([X, Xr])
        Y = torch.cat([Y, torch.stack([targets(sc, grid, labels) for sc in scenes])])
        del Xr
    Xv = load_images(val, args.data, args.image_size, "val images", args.workers)
    Yv = torch.stack([targets(r["scene"], grid, labels) for r in val])
    # the whole uint8 set on the device (20,000 images at 256 px: 3.9 GB), so a step moves nothing
    encoder, X, Y, Xv, Yv = (t.to(device) for t in (encoder, X, Y, Xv, Yv))
    with torch.no_grad():
        width = encoder(X[:1].float() / 255).shape[-1]
    objective = Objective(args.objective, labels, LEVELS[args.level].words, args.text_loss_weight).to(device)
    head = nn.Linear(width, objective.num_outputs).to(device)
    params = list(encoder.parameters()) + list(head.parameters())
    decay = [q for q in params if q.dim() > 1]
    no_decay = [q for q in params if q.dim() <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr)
    steps = args.steps
    if args.max_seconds:
        steps = fit_steps(args, encoder, head, objective, X, Y, device)
    warm = max(1, steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    groups = label_groups(labels)

    def evaluate() -> dict:
        encoder.eval()
        with torch.no_grad(), autocast(args, device):
            logits = torch.cat([head(encoder(x.float() / 255)).float() for x in Xv.split(100)])
        encoder.train()
        pred = objective.predict(logits)
        tp = (pred & (Yv > 0)).sum().item()
        f1 = 2 * tp / max(1, pred.sum().item() + (Yv > 0).sum().item())
        cells = (pred == (Yv > 0)).all(-1).float().mean().item()
        out = {"val_f1": round(f1, 4), "val_cells_exact": round(cells, 4)}
        # per label group: the overall F1 is dominated by the many shape and colour positives
        out.update({f"val_f1_{g}": v for g, v in group_f1(pred, Yv, groups).items()})
        if where == "image":
            out["val_position_acc"] = position_accuracy(pred, [r["scene"] for r in val], grid, labels)
        if args.counts:
            out["val_count_acc"] = count_accuracy(pred, [r["scene"] for r in val], labels)
        return out

    from tqdm import tqdm

    g = torch.Generator().manual_seed(args.seed)
    log = []
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="pretrain encoder", unit="step", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(0, len(X), (args.batch_size,), generator=g).to(device)
        with autocast(args, device):
            with torch.set_grad_enabled(step >= args.head_steps):
                feats = encoder(X[idx].float() / 255)
            loss = objective.loss(head(feats), Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            rec = {"step": step + 1, "loss": round(loss.item(), 5), **evaluate(),
                   "seconds": round(time.perf_counter() - t0, 1)}
            log.append(rec)
            tqdm.write(json.dumps(rec))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save_file(state, args.out + ".tmp", metadata={"format": "pt", "what": "FastViTHD train-form weights"})
    os.replace(args.out + ".tmp", args.out)
    with open(os.path.splitext(args.out)[0] + ".log.json", "w") as f:
        json.dump({"args": vars(args), "steps_run": steps, "device": str(device), "labels": list(labels),
                   "grid": grid, "log": log}, f, indent=1)
    print(f"wrote {args.out} ({len(state)} tensors); final {log[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
