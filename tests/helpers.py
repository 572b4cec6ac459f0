"""Shared test helpers: non-trivial random weights and small tokenizers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

CORPUS = [
    "What is in the image? A red circle and two blue squares.",
    "How many circles are there? 3",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "Describe the picture in one sentence, please.",
    "yes no left right above below red green blue yellow purple orange black",
]


def small_tokenizer(vocab_size: int = 300):
    from fastvlm.tokenization import train_bpe_tokenizer

    return train_bpe_tokenizer(CORPUS * 5, vocab_size=vocab_size)


@torch.no_grad()
def perturb_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every statistic and gain far from its initial value, so a mis-wired branch shows.

    Layer scales become O(0.03-0.12) instead of 1e-5, BN running statistics and affine
    parameters and norm gains move well away from 0/1. Apply to a train-form encoder
    before fusing to exercise the fusion arithmetic as well.
    """
    g = torch.Generator().manual_seed(seed)
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and not name.startswith("language_model"):
            # variance-preserving weights, so the output depends on the input (with 0.02-std
            # weights a deep random encoder collapses to a constant and any parity test passes)
            fan_in = mod.weight[0].numel()
            mod.weight.normal_(0, 1.0 / fan_in**0.5, generator=g)
            if mod.bias is not None:
                mod.bias.normal_(0, 0.05, generator=g)
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.normal_(0, 0.2, generator=g)
            mod.running_var.uniform_(0.5, 2.0, generator=g)
            mod.weight.uniform_(0.5, 1.5, generator=g)
            mod.bias.normal_(0, 0.2, generator=g)
    for name, p in model.named_parameters():
        if "layer_scale" in name:
            p.uniform_(0.03, 0.12, generator=g)
        elif p.dim() == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight"):
            p.uniform_(0.5, 1.5, generator=g)
        elif p.dim() == 1 and "norm" in name and name.endswith("bias"):
            p.normal_(0, 0.1, generator=g)
    return model


def train_in_process(recipe_dict: dict) -> dict:
    """Run a training recipe (a dict) in this process on one thread; returns the run summary."""
    from fastvlm.train.recipe import recipe_from_dict
    from fastvlm.train.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(recipe_from_dict(recipe_dict), progress=False)
    finally:
        torch.set_num_threads(threads)


SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name: str):
    """scripts/NAME.py imported as module NAME, registered in sys.modules (so a script that imports another finds
    it, and worker processes can unpickle its functions)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
