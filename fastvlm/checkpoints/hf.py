"""transformers' native `fast_vlm` layout (`FastVlmForConditionalGeneration`, reference doc §8.4).

The encoder is timm's `fastvit_mci3` under `model.vision_tower.timm_model.`, the
projector is `model.multi_modal_projector.linear_{1,2}`, the LLM sits under
`model.language_model.`; the tokenizer has an `<image>` token, and the vocabulary grows to a
multiple of 64 only when that token does not fit or it is not one (`padded_vocab`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from ..config import FastVLMConfig, VisionConfig
from ..errors import CheckpointError
from .apple import EXTRA_VISION_KEY, QWEN2_FIELDS
from .timm_keys import apple_to_timm, timm_to_apple

NAME = "hf"
VISION_PREFIX = "model.vision_tower.timm_model."
PROJ = {"0": "linear_1", "2": "linear_2"}
PROJ_BACK = {v: k for k, v in PROJ.items()}


def matches(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "fast_vlm"


def to_config(cfg: dict[str, Any]) -> FastVLMConfig:
    text_cfg = dict(cfg.get("text_config") or {})
    if not text_cfg:
        raise CheckpointError("fast_vlm config.json has no text_config")
    vcfg = cfg.get("vision_config") or {}
    arch = vcfg.get("architecture", "fastvit_mci3")
    seq = int(cfg.get("image_seq_length", 256))
    side = int(round(math.sqrt(seq)))
    if side * side != seq:
        raise CheckpointError(f"image_seq_length={seq} is not a square number of tokens")
    if EXTRA_VISION_KEY in cfg:
        vision = VisionConfig(**cfg[EXTRA_VISION_KEY])
    else:
        if arch != "fastvit_mci3":
            raise CheckpointError(f"unsupported vision architecture {arch!r} (FastVLM uses timm's fastvit_mci3)")
        vision = VisionConfig(image_size=side * 64, projection_dim=None)
    text = {"model_type": text_cfg.get("model_type", "qwen2")}
    for k in QWEN2_FIELDS:
        if k in text_cfg:
            text[k] = text_cfg[k]
    rp = text_cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        text["rope_theta"] = rp["rope_theta"]
    if "tie_word_embeddings" in cfg:
        text["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    act = cfg.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise CheckpointError(f"projector_hidden_act={act!r} is not supported (FastVLM uses gelu)")
    return FastVLMConfig(vision=vision, text=text, projector_type="mlp2x_gelu",
                         image_aspect_ratio=cfg.get("fastvlm_image_aspect_ratio", "pad"))


def to_internal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, vision = {}, {}
    for k, v in state.items():
        if k.startswith(VISION_PREFIX):
            vision[k[len(VISION_PREFIX):]] = v
        elif k.startswith("model.multi_modal_projector."):
            layer, rest = k[len("model.multi_modal_projector."):].split(".", 1)
            if layer not in PROJ_BACK:
                out["<unknown>." + k] = v
                continue
            out[f"mm_projector.{PROJ_BACK[layer]}.{rest}"] = v
        elif k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            out["language_model.lm_head.weight"] = v
        else:
            out["<unknown>." + k] = v
    for k, v in timm_to_apple(vision).items():
        out["vision_tower." + k] = v
    return out


def from_internal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, vision = {}, {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            vision[k[len("vision_tower."):]] = v
        elif k.startswith("mm_projector."):
            idx, rest = k[len("mm_projector."):].split(".", 1)
            out[f"model.multi_modal_projector.{PROJ[idx]}.{rest}"] = v
        elif k.startswith("language_model.model."):
            out["model.language_model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            out["lm_head.weight"] = v
        else:
            raise CheckpointError(f"no transformers-layout name for tensor {k!r}")
    vision.pop("head.proj", None)  # MobileCLIP's unused head: the port deletes it
    for k, v in apple_to_timm(vision).items():
        out[VISION_PREFIX + k] = v
    return out


def padded_vocab(vocab_size: int) -> int:
    """The vocabulary plus `<image>`, rounded up to a multiple of 64 (151936 -> 152000, as the port's conversion
    script always does; the caller only grows the vocabulary when `<image>` does not fit or it is not a multiple of
    64, so a second conversion changes nothing)."""
    return int(math.ceil((vocab_size + 1) / 64) * 64)


def pad_vocab_rows(weight: torch.Tensor, new_rows: int) -> torch.Tensor:
    """Extra rows get the mean of the existing ones (the port samples them; a mean is reproducible)."""
    if new_rows <= weight.shape[0]:
        return weight
    extra = weight.float().mean(0, keepdim=True).to(weight.dtype).expand(new_rows - weight.shape[0], -1)
    return torch.cat([weight, extra], 0)


def from_config(config: FastVLMConfig, text_config_dict: dict[str, Any], image_token_id: int, vocab_size: int,
                dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    text = dict(text_config_dict)
    text["vocab_size"] = vocab_size
    text.setdefault("model_type", "qwen2")
    cfg: dict[str, Any] = {
        "architectures": ["FastVlmForConditionalGeneration"],
        "model_type": "fast_vlm",
        "image_token_id": image_token_id,
        "image_token_index": image_token_id,
        "image_seq_length": config.vision.num_tokens(),
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": bool(text.get("tie_word_embeddings", False)),
        "text_config": text,
        "vision_config": {
            "model_type": "timm_wrapper",
            "architecture": "fastvit_mci3",
            "do_pooling": False,
            "global_pool": "avg",
            "hidden_size": config.vision.out_channels,
            "initializer_range": 0.02,
            "model_args": {"inference_mode": True},
            "num_classes": 0,
        },
        "dtype": str(dtype).replace("torch.", ""),
        "transformers_version": transformers.__version__,
        "fastvlm_image_aspect_ratio": config.image_aspect_ratio,
    }
    default = VisionConfig(image_size=config.vision.image_size, projection_dim=config.vision.projection_dim)
    if dataclasses.asdict(config.vision) != dataclasses.asdict(default):
        cfg[EXTRA_VISION_KEY] = {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in dataclasses.asdict(config.vision).items()}
        cfg[EXTRA_VISION_KEY]["projection_dim"] = None
    return cfg
