"""Apple's released layout (ml-fastvlm / `apple/FastVLM-*`): a LLaVA `llava_qwen2` checkpoint.

config.json is a Qwen2 config plus LLaVA's `mm_*` fields; tensors are named as
`LlavaQwen2ForCausalLM.state_dict()` names them (reference doc §6, §8.3).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..config import FastVLMConfig, VisionConfig
from ..errors import CheckpointError

NAME = "apple"
VISION_PREFIX = "model.vision_tower.vision_tower.model."
PROJECTOR_PREFIX = "model.mm_projector."

# Qwen2Config fields carried between the flat LLaVA config and our `text` dict.
QWEN2_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps",
    "use_cache", "tie_word_embeddings", "rope_theta", "rope_scaling", "use_sliding_window", "sliding_window",
    "max_window_layers", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id",
)

# Our own extension: a non-standard encoder (tests, the bundled model) is described here;
# the released checkpoints do not have this key and get the FastViTHD of their tower name.
EXTRA_VISION_KEY = "fastvlm_vision_config"


def matches(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") in ("llava_qwen2", "llava_qwen", "llava") or "mm_vision_tower" in cfg


def text_fields(cfg: dict[str, Any]) -> dict[str, Any]:
    text = {"model_type": "qwen2"}
    for k in QWEN2_FIELDS:
        if k in cfg:
            text[k] = cfg[k]
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in text:
        text["rope_theta"] = rp["rope_theta"]
    return text


def to_config(cfg: dict[str, Any]) -> FastVLMConfig:
    tower = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not tower:
        raise CheckpointError("Apple/LLaVA config.json has no mm_vision_tower")
    if cfg.get("mm_use_im_start_end"):
        raise CheckpointError("mm_use_im_start_end=true is not supported (the released FastVLM models do not use it)")
    # The reference's process_images pads only for "pad"; any other value, a null or a missing key (its getattr
    # default is None) takes the processor's shortest-edge resize and centre crop.
    aspect = cfg.get("image_aspect_ratio")
    if aspect not in ("pad", "square", None) and "anyres" in str(aspect):
        raise CheckpointError(f"image_aspect_ratio={aspect!r} (tiling) is not supported; released models use 'pad'")
    if EXTRA_VISION_KEY in cfg:
        vision = VisionConfig(**cfg[EXTRA_VISION_KEY])
    else:
        m = re.fullmatch(r"mobileclip_l_(\d+)", str(tower).split("/")[-1])
        if not m:
            raise CheckpointError(
                f"unsupported vision tower {tower!r}: FastVLM checkpoints use 'mobileclip_l_<resolution>' (FastViTHD)"
            )
        size = int(m.group(1))
        if size < 64 or size % 64:
            raise CheckpointError(f"mm_vision_tower {tower!r} names a {size} px encoder; FastViTHD needs a positive "
                                  f"multiple of 64")
        vision = VisionConfig(image_size=size)
    mm_hidden = cfg.get("mm_hidden_size")
    if mm_hidden is not None and int(mm_hidden) != vision.out_channels:
        raise CheckpointError(f"mm_hidden_size={mm_hidden} but the FastViTHD encoder gives {vision.out_channels} channels")
    return FastVLMConfig(
        vision=vision,
        text=text_fields(cfg),
        projector_type=cfg.get("mm_projector_type", "mlp2x_gelu"),
        image_aspect_ratio="pad" if aspect == "pad" else "crop",
        max_length=int(cfg.get("tokenizer_model_max_length") or 8192),
    )


def to_internal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith(VISION_PREFIX):
            out["vision_tower." + k[len(VISION_PREFIX):]] = v
        elif k.startswith(PROJECTOR_PREFIX):
            out["mm_projector." + k[len(PROJECTOR_PREFIX):]] = v
        elif k.startswith("model."):
            out["language_model.model." + k[len("model."):]] = v
        elif k == "lm_head.weight":
            out["language_model.lm_head.weight"] = v
        else:
            out["<unknown>." + k] = v  # reported as unexpected by the strict check
    return out


def from_internal(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        if k.startswith("vision_tower."):
            out[VISION_PREFIX + k[len("vision_tower."):]] = v
        elif k.startswith("mm_projector."):
            out[PROJECTOR_PREFIX + k[len("mm_projector."):]] = v
        elif k.startswith("language_model.model."):
            out["model." + k[len("language_model.model."):]] = v
        elif k == "language_model.lm_head.weight":
            out["lm_head.weight"] = v
        else:
            raise CheckpointError(f"no Apple-layout name for tensor {k!r}")
    return out


def from_config(config: FastVLMConfig, text_config_dict: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """config.json for Apple's layout: every field the released checkpoints carry (doc §6)."""
    import transformers

    text = {k: v for k, v in config.text.items() if k != "model_type"}
    cfg: dict[str, Any] = {
        "_name_or_path": "fastvlm",
        "architectures": ["LlavaQwen2ForCausalLM"],
        "model_type": "llava_qwen2",
        **{k: text_config_dict.get(k, text.get(k)) for k in QWEN2_FIELDS if k in text or k in text_config_dict},
        "rope_theta": text.get("rope_theta", 1000000.0),
        "torch_dtype": str(dtype).replace("torch.", ""),
        "transformers_version": transformers.__version__,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad" if config.image_aspect_ratio == "pad" else "square",
        "image_grid_pinpoints": None,
        "mm_hidden_size": config.vision.out_channels,
        "mm_patch_merge_type": "flat",
        "mm_projector_lr": None,
        "mm_projector_type": config.projector_type,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": f"mobileclip_l_{config.vision.image_size}",
        "tokenizer_model_max_length": config.max_length,
        "tokenizer_padding_side": "right",
        "tune_mm_mlp_adapter": False,
        "unfreeze_mm_vision_tower": True,
        "use_mm_proj": True,
    }
    cfg.pop("rope_parameters", None)
    if dataclasses.asdict(config.vision) != dataclasses.asdict(VisionConfig(image_size=config.vision.image_size)):
        cfg[EXTRA_VISION_KEY] = {k: list(v) if isinstance(v, tuple) else v
                                 for k, v in dataclasses.asdict(config.vision).items()}
    return cfg


def write_reference_tokenizer_files(tokenizer, directory: str, max_length: int) -> bool:
    """Also write the tokenizer as Apple's folders hold it: Qwen2's vocab.json, merges.txt, added_tokens.json,
    special_tokens_map.json and a `Qwen2Tokenizer` tokenizer_config.json, which the reference (transformers 4.x,
    `use_fast=False`) can read; transformers 5 writes only tokenizer.json and a config 4.x cannot parse.

    Only for Qwen2's pipeline (NFC, Qwen2's split regex, byte-level BPE), which this project's trained tokenizers
    share: the files name `Qwen2Tokenizer`, which applies exactly that, so another byte-level BPE would tokenize
    differently from them. Returns whether the files were written.
    """
    import json
    import os

    from ..tokenization import QWEN2_SPLIT_REGEX
    from .io import atomic_write_json, atomic_write_text

    try:
        spec = json.loads(tokenizer.backend_tokenizer.to_str())
    except AttributeError:
        return False
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    split = [s for s in steps if s.get("type") == "Split"]
    if (model.get("type") != "BPE" or (spec.get("normalizer") or {}).get("type") != "NFC"
            or [s.get("type") for s in steps] != ["Split", "ByteLevel"]
            or split[0].get("pattern", {}).get("Regex") != QWEN2_SPLIT_REGEX):
        return False
    added = sorted(spec.get("added_tokens", []), key=lambda t: t["id"])
    added_ids = {t["id"] for t in added}
    vocab = {tok: i for tok, i in model["vocab"].items() if i not in added_ids}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    atomic_write_json(os.path.join(directory, "vocab.json"), vocab)
    atomic_write_text(os.path.join(directory, "merges.txt"), "#version: 0.2\n" + "".join(m + "\n" for m in merges))
    atomic_write_json(os.path.join(directory, "added_tokens.json"), {t["content"]: t["id"] for t in added})
    specials = [t["content"] for t in added if t.get("special")]
    extra = [s for s in specials if s not in (tokenizer.eos_token, tokenizer.pad_token, "<|endoftext|>")]
    special_map = {"additional_special_tokens": extra, "eos_token": tokenizer.eos_token,
                   "pad_token": tokenizer.pad_token}
    atomic_write_json(os.path.join(directory, "special_tokens_map.json"), special_map)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {"content": t["content"], "lstrip": bool(t.get("lstrip")),
                                                "normalized": bool(t.get("normalized")),
                                                "rstrip": bool(t.get("rstrip")),
                                                "single_word": bool(t.get("single_word")),
                                                "special": bool(t.get("special"))} for t in added},
        **special_map,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": int(max_length),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    atomic_write_json(os.path.join(directory, "tokenizer_config.json"), config)
    return True
