"""Convert a checkpoint between the Apple (llava_qwen2), transformers (fast_vlm) and fastvlm layouts.

  fastvlm convert llava-fastvithd_0.5b_stage3 out-hf --to hf
  fastvlm convert out-hf out-apple --to apple --max-shard-size 2GB
The source layout is detected from its config.json. Weights keep their dtype unless --dtype is given.
DST must be new or empty (or SRC itself: a checkpoint can be converted in place, which removes the old layout's
weight and generation/processor config files that the new one lacks); --overwrite replaces the model files of an
existing checkpoint in DST and leaves its other files alone.
Converting to 'hf' adds an <image> token; the vocabulary grows (to a multiple of 64) only when that token does not
fit or it is not a multiple of 64, so Qwen2's 151,936 rows stay (transformers' own conversion script always grows
them, to 152,000).
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys

# What a checkpoint folder of any layout consists of (the writers in fastvlm.checkpoints and
# tokenizer/processor save_pretrained, and the files of Apple's and transformers' releases):
# --overwrite removes these from DST, and nothing else.
MODEL_FILE_NAMES = frozenset({
    "config.json", "generation_config.json", "generate_config.json",
    "preprocessor_config.json", "processor_config.json", "image_processor_config.json",
    "video_preprocessor_config.json", "fastvlm_processor.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja",
})
MODEL_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.tiktoken")
# What one layout writes and another does not: an in-place conversion removes these when the new layout lacks
# them. Tokenizer files stay (the same tokenizer in another form, which other tools may read).
LAYOUT_FILE_NAMES = frozenset({
    "generation_config.json", "generate_config.json", "preprocessor_config.json", "processor_config.json",
    "image_processor_config.json", "video_preprocessor_config.json", "fastvlm_processor.json",
})
LAYOUT_FILE_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")

# --dtype names convert accepts (resolve_dtype's, less "auto": a conversion must not depend on the machine)
_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "bf16": "bf16", "bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16"}


def _dtype_arg(text: str) -> str:
    try:
        return _DTYPE_NAMES[text.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r}; use one of fp32, bf16, fp16 (or leave --dtype out to keep the "
            "checkpoint's dtype)") from None


def add_arguments(p):
    p.add_argument("src", help="source checkpoint directory (or Hub id)")
    p.add_argument("dst", help="output directory: new, empty, or SRC itself (see --overwrite)")
    p.add_argument("--to", required=True, choices=["fastvlm", "apple", "hf"], help="target layout")
    p.add_argument("--dtype", default=None, type=_dtype_arg, metavar="{fp32,bf16,fp16}",
                   help="cast weights to this dtype; default: keep the checkpoint's dtype")
    p.add_argument("--max-shard-size", default=None, help="split weights into shards of at most this size (e.g. 5GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty DST: first remove the model files in it (weights, configs, tokenizer "
                        "and processor files of any layout) and leave any other files alone")


def is_model_file(name: str) -> bool:
    """A file a checkpoint folder of any layout consists of (or a temporary one its writers leave)."""
    if name.endswith(".tmp"):
        name = name[: -len(".tmp")]
    return name in MODEL_FILE_NAMES or any(fnmatch.fnmatchcase(name, pat) for pat in MODEL_FILE_PATTERNS)


def remove_model_files(directory: str) -> list[str]:
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if is_model_file(name) and os.path.isfile(path) and not os.path.islink(path):
            os.remove(path)
            removed.append(name)
    return removed


def check_output_dir(path: str, overwrite: bool) -> None:
    """A non-empty output directory is refused unless --overwrite is given."""
    from ..errors import ConfigError

    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(f"output directory {path} is not empty; choose a new or empty directory, or pass "
                          "--overwrite to replace the model files in it")


def _same_directory(src: str, dst: str) -> bool:
    src = os.path.expanduser(src)
    return os.path.isdir(src) and os.path.isdir(dst) and os.path.samefile(src, dst)


def run(args) -> int:
    from .common import parse_size, prepare_output_dir, remove_if_empty

    max_shard_size = parse_size(args.max_shard_size)
    # Check DST before any heavy work (a Hub download, loading the weights).
    in_place = _same_directory(args.src, args.dst)
    if not in_place:
        check_output_dir(args.dst, args.overwrite)
    created = prepare_output_dir(args.dst)
    try:
        import torch

        from ..checkpoints import convert, read_config, resolve_path
        from ..model import resolve_dtype

        src = resolve_path(args.src)
        read_config(src)  # a bad SRC fails before anything in DST is removed
        if args.overwrite and not in_place and not created:
            removed = remove_model_files(args.dst)
            if removed:
                print(f"removed {len(removed)} model file(s) from {args.dst}: {', '.join(removed)}", file=sys.stderr)
        dtype = resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype else None
        if in_place:
            notes = _convert_in_place(src, args.dst, args.to, dtype=dtype, max_shard_size=max_shard_size)
        else:
            notes = convert(src, args.dst, args.to, dtype=dtype, max_shard_size=max_shard_size)
    except BaseException:
        if created:
            remove_if_empty(args.dst)
        raise
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {args.dst} ({args.to} layout)", file=sys.stderr)
    return 0


def _convert_in_place(src: str, dst: str, layout: str, **kwargs) -> list[str]:
    """Convert into a folder inside DST, then move the new files over the old ones and remove the old layout's
    model files that the new one does not have (another layout's generation or processor config, say)."""
    import shutil
    import tempfile

    from ..checkpoints import convert

    tmp = tempfile.mkdtemp(prefix=".convert-", dir=dst)
    try:
        notes = convert(src, tmp, layout, **kwargs)
        new = set(os.listdir(tmp))
        stale = sorted(n for n in os.listdir(dst) if n not in new and os.path.isfile(os.path.join(dst, n))
                       and (n in LAYOUT_FILE_NAMES or any(fnmatch.fnmatchcase(n, p) for p in LAYOUT_FILE_PATTERNS)))
        for name in sorted(new):
            os.replace(os.path.join(tmp, name), os.path.join(dst, name))
        for name in stale:
            os.remove(os.path.join(dst, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if stale:
        notes.append(f"removed the previous layout's {', '.join(stale)}")
    return notes
