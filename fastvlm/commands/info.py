"""Show a model's layout, configuration, parameter counts per part and visual tokens per resolution.

Reads config.json only (no weights are loaded), so it is instant even for the 7B model.
  fastvlm info --model DIR
  fastvlm info --preset fastvlm-0.5b --resolution 512 1024 1536
"""

from __future__ import annotations

import json


def add_arguments(p):
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", "-m", help="checkpoint directory (default: the bundled model)")
    g.add_argument("--preset", help="a preset architecture instead of a checkpoint")
    p.add_argument("--resolution", type=int, nargs="*", default=None,
                   help="resolutions to list visual tokens for, each a positive multiple of the encoder's stride (64) "
                        "(default: 256 512 768 1024 1536 2048)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args) -> int:
    import torch

    from ..checkpoints import read_config
    from ..config import get_preset
    from ..errors import ConfigError
    from ..model import FastVLM
    from .common import bundled_model_path

    if args.preset:
        config, layout, source = get_preset(args.preset), "preset", args.preset
    else:
        source = args.model or bundled_model_path()
        if source is None:
            raise ConfigError("pass --model DIR or --preset NAME (no bundled model in this install)")
        config, layout = read_config(source)
    with torch.device("meta"):
        model = FastVLM(config, init_weights=False)
    params = model.num_parameters()
    resolutions = args.resolution or [256, 512, 768, 1024, 1536, 2048]
    for r in resolutions:
        if r <= 0 or r % config.vision.patch_size:
            raise ConfigError(f"resolution {r} is not a positive multiple of {config.vision.patch_size}")
    tokens = {r: config.vision.num_tokens(r) for r in resolutions}
    info = {
        "source": source,
        "layout": layout,
        "image_size": config.image_size,
        "image_tokens": config.num_image_tokens,
        "encoder": {"depths": list(config.vision.depths), "embed_dims": list(config.vision.embed_dims),
                    "mixers": list(config.vision.token_mixers), "out_channels": config.vision.out_channels,
                    "stride": config.vision.patch_size, "fused": config.vision.inference_mode},
        "projector": config.projector_type,
        "language_model": {k: config.text.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                           "num_attention_heads", "num_key_value_heads",
                                                           "intermediate_size", "vocab_size")},
        "parameters": params,
        "visual_tokens_by_resolution": tokens,
        "image_aspect_ratio": config.image_aspect_ratio,
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{source}  ({layout} layout)")
    print(f"  resolution     {config.image_size}px -> {config.num_image_tokens} image tokens "
          f"(stride {config.vision.patch_size}), preprocessing: {config.image_aspect_ratio}")
    e = info["encoder"]
    print(f"  encoder        FastViTHD depths {e['depths']} dims {e['embed_dims']} -> {e['out_channels']} channels"
          f" ({'fused' if e['fused'] else 'train-time branches'})")
    print(f"  projector      {config.projector_type}")
    lm = info["language_model"]
    print(f"  language model {lm['model_type']} hidden {lm['hidden_size']} layers {lm['num_hidden_layers']} "
          f"heads {lm['num_attention_heads']}/{lm['num_key_value_heads']} vocab {lm['vocab_size']}")
    print("  parameters")
    for k, v in params.items():
        label = "  of which unused head" if k == "vision_tower_head_unused" else k  # part of vision_tower's count
        print(f"    {label:26s} {v / 1e6:10.2f} M")
    print("  visual tokens  " + ", ".join(f"{r}px: {t}" for r, t in tokens.items()))
    return 0
