#!/usr/bin/env python
"""Average the weights of exported models of one architecture (a uniform "model soup").

Each MODEL is a folder that `fastvlm train` exported (config.json, model.safetensors, tokenizer files). Every
floating-point tensor of the output is the mean of the models' tensors, computed in float64 and stored in the
first model's dtype; integer tensors must be equal in all models. The config and tokenizer files are copied from
the first model, after checking that the models' configs agree. Only safetensors are read.

  python scripts/average_models.py runs/a/final runs/b/final --out runs/soup/final
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


class AverageError(ValueError):
    pass


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise AverageError(f"{folder}: no config.json (not an exported fastvlm model folder)")
    return json.loads(path.read_text())


def average_state_dicts(states: list[dict[str, torch.Tensor]], names: list[str]) -> dict[str, torch.Tensor]:
    """The element-wise mean of each floating-point tensor; other tensors must be identical."""
    if len(states) < 2:
        raise AverageError("give at least two models to average")
    keys = set(states[0])
    for state, name in zip(states[1:], names[1:]):
        if set(state) != keys:
            missing, extra = sorted(keys - set(state)), sorted(set(state) - keys)
            raise AverageError(f"{name}: different tensors from {names[0]} (missing {missing[:5]}, extra {extra[:5]})")
    out = {}
    for key in sorted(keys):
        first = states[0][key]
        for state, name in zip(states[1:], names[1:]):
            if state[key].shape != first.shape or state[key].dtype != first.dtype:
                raise AverageError(f"{name}: {key} is {tuple(state[key].shape)} {state[key].dtype}, "
                                   f"{names[0]} has {tuple(first.shape)} {first.dtype}")
        if first.is_floating_point():
            total = sum(state[key].to(torch.float64) for state in states)
            out[key] = (total / len(states)).to(first.dtype).contiguous()
        else:
            for state, name in zip(states[1:], names[1:]):
                if not torch.equal(state[key], first):
                    raise AverageError(f"{name}: non-float tensor {key} differs from {names[0]}'s")
            out[key] = first.clone()
    return out


def average_models(folders: list[Path], out: Path) -> None:
    configs = [_config(f) for f in folders]
    for folder, config in zip(folders[1:], configs[1:]):
        if config != configs[0]:
            diff = sorted(k for k in set(config) | set(configs[0]) if config.get(k) != configs[0].get(k))
            raise AverageError(f"{folder}: config differs from {folders[0]}'s in {diff}")
    states = []
    for folder in folders:
        path = folder / WEIGHTS
        if not path.is_file():
            sharded = (folder / (WEIGHTS + ".index.json")).is_file()
            raise AverageError(f"{folder}: no {WEIGHTS}" + (" (sharded checkpoints are not supported)" if sharded else ""))
        states.append(load_file(str(path)))
    averaged = average_state_dicts(states, [str(f) for f in folders])
    out.mkdir(parents=True, exist_ok=True)
    for item in folders[0].iterdir():
        if item.is_file() and item.name != WEIGHTS:
            shutil.copy2(item, out / item.name)
    if any((f / "train_form").is_dir() for f in folders):
        # the multi-branch encoders (fastvlm.train.build.TRAIN_FORM_FILE) are not averaged: a stage started from
        # the average trains its fused encoder
        print(f"note: {out} has no train_form/ (the sources' multi-branch encoders are not averaged)", file=sys.stderr)
    tmp = out / (WEIGHTS + ".tmp")
    save_file(averaged, str(tmp), metadata={"format": "pt", "averaged_from": json.dumps([str(f) for f in folders])})
    tmp.replace(out / WEIGHTS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path, help="exported model folders (two or more)")
    ap.add_argument("--out", required=True, type=Path, help="folder to write the averaged model to")
    args = ap.parse_args(argv)
    try:
        average_models(args.models, args.out)
    except AverageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the mean of {len(args.models)} models to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
