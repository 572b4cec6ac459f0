"""Arguments and model loading shared by the commands."""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources

from ..errors import CheckpointError, ConfigError

BUNDLED_MODEL_NAME = "fastvlm-synth"


def bundled_model_path() -> str | None:
    """Directory of the small model shipped inside the package, if this install has it."""
    path = resources.files("fastvlm") / "assets" / BUNDLED_MODEL_NAME
    path = str(path)
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def add_model_args(p: argparse.ArgumentParser, *, model_required: bool = False) -> None:
    p.add_argument("--model", "-m", required=model_required, default=None,
                   help="checkpoint directory (Apple, transformers or fastvlm layout) or Hugging Face Hub id; "
                        "default: the small model bundled with the package")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu or auto (CUDA, then MPS, then CPU)")
    p.add_argument("--dtype", default="auto",
                   help="fp32, bf16, fp16 or auto (bf16 on CUDA and on CPUs with native bf16, fp16 on MPS, else fp32)")
    p.add_argument("--image-size", type=int, default=None,
                   help="run the encoder at this resolution instead of the checkpoint's (a multiple of 64)")
    p.add_argument("--exact", action="store_true",
                   help="the reference arithmetic (NCHW, unfused softmax attention, no folded BatchNorm or fused "
                        "kernels) instead of the fast path")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default) decodes greedily; > 0 samples with this temperature")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0: off)")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default 1.0)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def sampling_kwargs(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature if args.temperature > 0 else 1.0,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
    )


def model_path(args) -> str:
    if args.model:
        return args.model
    path = bundled_model_path()
    if path is None:
        raise ConfigError("no --model given and this install has no bundled model; pass --model DIR "
                          "(e.g. one written by `fastvlm init`)")
    return path


def load_model(args):
    from .. import kernels
    from ..model import FastVLM

    kernels.tune_allocator()  # reuse activation memory between requests (see its docstring)
    path = model_path(args)
    print(f"loading {path} ...", file=sys.stderr)
    model = FastVLM.from_pretrained(path, device=args.device, dtype=args.dtype, image_size=args.image_size)
    if model.processor is None:
        raise CheckpointError(f"{path} has no tokenizer files; generation needs a tokenizer")
    # fast: fused encoder, channels-last, SDPA, native decode kernels; exact: the reference arithmetic
    model.optimize_for_inference("exact" if getattr(args, "exact", False) else "fast")
    print(f"model: {path} | device {model.device} | dtype {str(model.dtype).replace('torch.', '')} | "
          f"{model.config.image_size}px -> {model.num_image_tokens} image tokens", file=sys.stderr)
    return model


def parse_size(text: str | None) -> int | None:
    """'5GB', '500MB', '1024' -> bytes."""
    if text is None:
        return None
    t = text.strip().upper()
    for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ConfigError(f"cannot read size {text!r}; use e.g. 5GB or 500MB") from None
