"""Convert a checkpoint between the Apple (llava_qwen2), transformers (fast_vlm) and fastvlm layouts.

  fastvlm convert llava-fastvithd_0.5b_stage3 out-hf --to hf
  fastvlm convert out-hf out-apple --to apple --max-shard-size 2GB
The source layout is detected from its config.json. Weights keep their dtype unless --dtype is given.
Converting to 'hf' adds an <image> token and pads the vocabulary to a multiple of 64 as transformers' port does.
"""

from __future__ import annotations

import sys


def add_arguments(p):
    p.add_argument("src", help="source checkpoint directory (or Hub id)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--to", required=True, choices=["fastvlm", "apple", "hf"], help="target layout")
    p.add_argument("--dtype", default=None, help="cast weights (fp32, bf16, fp16); default: keep")
    p.add_argument("--max-shard-size", default=None, help="split weights into shards of at most this size (e.g. 5GB)")


def run(args) -> int:
    from ..checkpoints import convert
    from ..model import resolve_dtype
    from .common import parse_size

    import torch

    dtype = resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype else None
    convert(args.src, args.dst, args.to, dtype=dtype, max_shard_size=parse_size(args.max_shard_size))
    print(f"wrote {args.dst} ({args.to} layout)", file=sys.stderr)
    return 0
