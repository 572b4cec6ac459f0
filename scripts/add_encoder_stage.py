#!/usr/bin/env python
"""Give a reduced FastViTHD one more stage: twice the downsampling, a quarter of the tokens.

FastViTHD's point is the stride: its fifth stage takes the encoder from FastViT's 32x to 64x, so that a
1024 px image gives 256 tokens. The bundled model's encoder at 512 px gives 64 tokens (an 8x8 grid); with a
sixth stage it gives 16, as at 256 px, while seeing the image at twice the resolution. This writes such an
encoder: every weight of the given five-stage encoder is kept under its own name (the new entries of
`FastViTHD.network` come after the old ones), and the new PatchEmbed, RepCPE and blocks start from the
model's own initialisation (layer scale 1e-5, so the new blocks start close to identity). `conv_exp` keeps its
weights when the new stage is as wide as the last one. The result initialises `scripts/pretrain_synth_encoder.py`
through `--set init.vision_tower=...` with the same `init.vision.*` settings this prints.

  python scripts/add_encoder_stage.py --encoder runs/res512/encoder-enc512.safetensors \\
      --config fastvlm/assets/fastvlm-synth/config.json --image-size 512 --out runs/s128/encoder-init.safetensors
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def extended_config(vision, depth: int, dim: int | None, mixer: str, image_size: int):
    """`vision` (a VisionConfig) with one more stage appended."""
    dim = dim or vision.embed_dims[-1]
    return dataclasses.replace(
        vision, image_size=image_size, depths=(*vision.depths, depth), embed_dims=(*vision.embed_dims, dim),
        mlp_ratios=(*vision.mlp_ratios, vision.mlp_ratios[-1]), token_mixers=(*vision.token_mixers, mixer),
        pos_embs=(*vision.pos_embs, mixer == "attention"))


def extend(state: dict, vision, depth: int = 1, dim: int | None = None, mixer: str = "attention",
           image_size: int | None = None, seed: int = 0):
    """(new VisionConfig, state dict, tensors kept): `state`'s weights in an encoder with one more stage."""
    import torch

    from fastvlm.errors import ConfigError
    from fastvlm.vision import FastViTHD

    config = extended_config(vision, depth, dim, mixer, image_size or vision.image_size)
    torch.manual_seed(seed)
    new = FastViTHD(config).state_dict()
    unknown = sorted(k for k in state if k not in new and not k.startswith("head."))
    if unknown:
        raise ConfigError(f"the encoder's weights do not fit a {len(vision.depths)}-stage FastViTHD of this config "
                          f"(first unknown key: {unknown[0]}); give the --config the encoder was made with")
    missing = sorted(k for k in FastViTHD(vision).state_dict() if k not in state and not k.startswith("head."))
    if missing:
        raise ConfigError(f"the encoder's weights lack {len(missing)} of a {len(vision.depths)}-stage FastViTHD's "
                          f"tensors (first: {missing[0]}); give the --config the encoder was made with")
    kept = 0
    for k, v in state.items():
        if k not in new:
            continue
        if tuple(new[k].shape) == tuple(v.shape):
            new[k] = v.clone()
            kept += 1
        elif not k.startswith("conv_exp."):  # conv_exp follows the new stage: its width changes with --dim
            raise ConfigError(f"the encoder's {k} has shape {tuple(v.shape)}, where a FastViTHD of this config has "
                              f"{tuple(new[k].shape)}; give the --config the encoder was made with")
    return config, new, kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoder", required=True, help="the five-stage encoder's weights (.safetensors: an encoder alone, or a whole model)")
    p.add_argument("--config", required=True,
                   help="a model config.json whose `vision` describes that encoder (its inference_mode must match "
                        "the weights: fused reparam_conv keys need true)")
    p.add_argument("--image-size", type=int, required=True, help="input resolution of the new encoder")
    p.add_argument("--depth", type=int, default=1, help="blocks in the new stage (default 1)")
    p.add_argument("--dim", type=int, default=None, help="its width (default the last stage's)")
    p.add_argument("--mixer", choices=["attention", "repmixer"], default="attention",
                   help="its token mixer (default attention, as FastViTHD's last stages)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new stage's initialisation")
    p.add_argument("--out", required=True, help="output .safetensors")
    args = p.parse_args(argv)

    from safetensors.torch import load_file, save_file

    from fastvlm.config import FastVLMConfig
    from fastvlm.train.build import encoder_weights

    with open(args.config) as f:
        vision = FastVLMConfig.from_dict(json.load(f)).vision
    config, state, kept = extend(encoder_weights(load_file(args.encoder)), vision, args.depth, args.dim, args.mixer,
                                 args.image_size, args.seed)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, args.out + ".tmp",
              metadata={"format": "pt", "what": f"FastViTHD, {len(config.depths)} stages, from {args.encoder}"})
    os.replace(args.out + ".tmp", args.out)
    sets = [f"init.vision.{name}=[{','.join(str(x).lower() for x in getattr(config, name))}]"
            for name in ("depths", "embed_dims", "mlp_ratios", "token_mixers", "pos_embs")]
    print(f"{args.out}: {kept} of {len(state)} tensors from {args.encoder}; stride {config.patch_size}, "
          f"{config.num_tokens()} tokens at {config.image_size} px")
    print("recipe settings: " + " ".join(f"--set {s}" for s in sets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
