"""Write a model of a preset architecture with random weights, in any layout: test and benchmark without downloads.

  fastvlm init --preset fastvlm-0.5b --out /tmp/fastvlm-0.5b-random
  fastvlm generate --model /tmp/fastvlm-0.5b-random --image examples/shapes.png --prompt "Describe it."
The real Qwen2 tokenizer cannot be bundled, so released-size presets get a stand-in byte-level
BPE tokenizer whose special tokens have Qwen2's ids; answers are noise, timings are real.
"""

from __future__ import annotations

import sys


def add_arguments(p):
    from ..config import PRESETS

    p.add_argument("--preset", required=True, choices=sorted(PRESETS), help="architecture")
    p.add_argument("--out", "-o", required=True, help="output directory")
    p.add_argument("--layout", default="fastvlm", choices=["fastvlm", "apple", "hf"], help="checkpoint layout")
    p.add_argument("--dtype", default="bf16", help="weight dtype on disk (default bf16, as released)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--image-size", type=int, default=None, help="encoder resolution (default: the preset's)")
    p.add_argument("--max-shard-size", default=None, help="shard the weights (e.g. 2GB)")
    p.add_argument("--overwrite", action="store_true",
                   help="allow a non-empty --out: first remove the model files in it (weights, configs, tokenizer "
                        "and processor files of any layout) and leave any other files alone")


def standin_tokenizer_for(config):
    """Qwen2-shaped stand-in tokenizer for released sizes; a small trained one for small vocabularies."""
    from ..tokenization import _STANDIN_CORPUS, QWEN2_BPE_VOCAB_SIZE, standin_qwen2_tokenizer, train_bpe_tokenizer

    vocab = int(config.text["vocab_size"])
    if vocab > QWEN2_BPE_VOCAB_SIZE + 2:
        return standin_qwen2_tokenizer()
    return train_bpe_tokenizer(_STANDIN_CORPUS.splitlines(keepends=True), min(vocab - 3, 4096))


def run(args) -> int:
    import torch

    from ..config import get_preset
    from ..model import FastVLM, resolve_dtype
    from .common import parse_size, prepare_output_dir, remove_if_empty
    from .convert import check_output_dir, remove_model_files

    config = get_preset(args.preset)
    if args.image_size:
        config = config.with_image_size(args.image_size)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    max_shard_size = parse_size(args.max_shard_size)
    check_output_dir(args.out, args.overwrite)
    created = prepare_output_dir(args.out)  # a bad --out fails now, not after building the model
    if args.overwrite and not created:
        removed = remove_model_files(args.out)
        if removed:
            print(f"removed {len(removed)} model file(s) from {args.out}: {', '.join(removed)}", file=sys.stderr)
    try:
        tokenizer = standin_tokenizer_for(config)
        print(f"building {args.preset} with random weights (seed {args.seed}) ...", file=sys.stderr)
        model = FastVLM.from_config(config, tokenizer=tokenizer, device="cpu", dtype=dtype, seed=args.seed)
        model.save_pretrained(args.out, layout=args.layout, max_shard_size=max_shard_size)
    except BaseException:
        if created:
            remove_if_empty(args.out)
        raise
    n = model.num_parameters()["total"]
    print(f"wrote {args.out} ({args.layout} layout, {n / 1e6:.1f} M parameters)", file=sys.stderr)
    return 0
