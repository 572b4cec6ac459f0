"""Arguments and model loading shared by the commands."""

from __future__ import annotations

import argparse
import math
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
                   help="fp32, bf16, fp16 or auto (bf16 on Ampere or later GPUs and on CPUs with native bf16, fp16 on older "
                        "GPUs and on MPS, else fp32)")
    p.add_argument("--image-size", type=int, default=None,
                   help="run the encoder at this resolution instead of the checkpoint's (a multiple of 64)")
    p.add_argument("--exact", action="store_true",
                   help="the reference arithmetic (NCHW, unfused softmax attention, no folded BatchNorm or fused "
                        "kernels) instead of the fast path")


def _float_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def _int_arg(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None


def _checked(parse, ok, message: str):
    """An argparse `type` that parses with `parse` and refuses values failing `ok` with `message`."""
    def check(text: str):
        value = parse(text)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{message}, got {text}")
        return value
    return check


# The same rules as generation.SamplingParams, checked when the arguments are parsed, so a bad
# value is refused at once, before any model loads.
_max_new_tokens_arg = _checked(_int_arg, lambda v: v >= 1, "max_new_tokens must be at least 1")
_temperature_arg = _checked(_float_arg, lambda v: v >= 0, "temperature must be >= 0")
_top_p_arg = _checked(_float_arg, lambda v: 0 <= v <= 1, "top_p must be in [0, 1]")
_top_k_arg = _checked(_int_arg, lambda v: v >= 0, "top_k must be >= 0")
_repetition_penalty_arg = _checked(_float_arg, lambda v: v > 0, "repetition_penalty must be > 0")
seconds_arg = _checked(_float_arg, lambda v: v >= 0, "must be a number of seconds, at least 0")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-new-tokens", type=_max_new_tokens_arg, default=256,
                   help="most tokens to generate, at least 1 (default 256)")
    g.add_argument("--temperature", type=_temperature_arg, default=0.0,
                   help="0 (default) decodes greedily; > 0 samples with this temperature")
    g.add_argument("--top-p", type=_top_p_arg, default=1.0,
                   help="nucleus sampling mass, in [0, 1]; 0 keeps only the most likely token (default 1.0: off)")
    g.add_argument("--top-k", type=_top_k_arg, default=0,
                   help="sample among the k most likely tokens, >= 0 (default 0: off)")
    g.add_argument("--repetition-penalty", type=_repetition_penalty_arg, default=1.0,
                   help="> 0; > 1 discourages repeats (default 1.0)")
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
    if model.device.type == "cpu" and not getattr(args, "exact", False):
        # a CPU that could run the native decode kernels but does not (no compiler, a failed build): say so once,
        # as decoding is then markedly slower; CPUs they do not support are not told about them
        kernels.load()
        why = kernels._state.get("why", "")
        if kernels._state.get("lib") is None and ("compiler" in why or why.startswith("build failed")):
            print(f"note: {kernels.status()}; decoding uses PyTorch's kernels, which are slower on this CPU",
                  file=sys.stderr)
    return model


def int_arg(minimum: int, maximum: int | None = None):
    """An argparse `type` for whole numbers in [minimum, maximum]: out of range or not a number is a usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


def parse_size(text: str | None) -> int | None:
    """'5GB', '500MB', '1024' -> bytes."""
    if text is None:
        return None
    t = text.strip().upper()
    size = None
    for suffix, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if t.endswith(suffix):
            try:
                size = float(t[: -len(suffix)]) * mult
            except ValueError:
                pass
            break
    if size is None:
        try:
            size = int(t)
        except ValueError:
            raise ConfigError(f"cannot read size {text!r}; use e.g. 5GB or 500MB") from None
    if not size >= 1 or size == float("inf"):
        raise ConfigError(f"size {text!r} must be at least one byte; use e.g. 5GB or 500MB")
    return int(size)


def prepare_output_dir(path: str) -> bool:
    """Check that `path` can be an output directory, and create it; True if this call created it.

    Runs before any heavy work, so a bad --out fails at once with a one-line ConfigError
    instead of a traceback after minutes of building or loading.
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"output path {path} exists and is not a directory")
    if os.path.isdir(path):
        return False
    try:
        os.makedirs(path)
    except OSError as e:
        raise ConfigError(f"cannot create output directory {path}: {e.strerror or e}") from None
    return True


def remove_if_empty(path: str) -> None:
    """Undo prepare_output_dir's mkdir after a failure, if nothing was written there."""
    try:
        os.rmdir(path)
    except OSError:
        pass
