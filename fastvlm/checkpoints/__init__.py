"""Checkpoint layouts: Apple's released one, transformers' `fast_vlm` port, and this project's own.

Every layout translates into one in-memory model (our internal tensor names:
`vision_tower.*`, `mm_projector.*`, `language_model.*`), so nothing else cares where
weights came from. Loading is strict: missing, unexpected or mis-shaped tensors are
all named in one error.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from typing import Any, Optional

import torch

from ..config import FastVLMConfig, load_config_file
from ..errors import CheckpointError, ConfigError
from . import apple, hf
from .io import atomic_write_json, check_keys, float_dtype, load_state_dict, save_state_dict, tensor_dtypes

LAYOUT_NAMES = ("fastvlm", "apple", "hf")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tokenizer_config.json")
EMBED_KEY = "language_model.model.embed_tokens.weight"
LM_HEAD_KEY = "language_model.lm_head.weight"


class _Native:
    """This project's layout: our config dataclass as JSON and our internal tensor names."""

    NAME = "fastvlm"

    @staticmethod
    def matches(cfg: dict[str, Any]) -> bool:
        return cfg.get("model_type") == "fastvlm"

    @staticmethod
    def to_config(cfg: dict[str, Any]) -> FastVLMConfig:
        return FastVLMConfig.from_dict(cfg)

    @staticmethod
    def to_internal(state):
        return dict(state)

    @staticmethod
    def from_internal(state):
        return dict(state)


native = _Native()
LAYOUTS = {"fastvlm": native, "apple": apple, "hf": hf}


def detect_layout(cfg: dict[str, Any], source: str = "config.json"):
    for layout in (native, hf, apple):
        if layout.matches(cfg):
            return layout
    raise CheckpointError(
        f"{source}: model_type {cfg.get('model_type')!r} is not a FastVLM checkpoint "
        "(expected 'llava_qwen2' (Apple), 'fast_vlm' (transformers) or 'fastvlm' (this project))"
    )


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_local_path(name: str) -> bool:
    """Whether `name` can only mean a local path (not a Hub id ORG/NAME): a missing one is 'no such directory'."""
    path = os.path.expanduser(str(name))
    return not _REPO_ID.match(str(name)) or path.startswith((".", "/"))


def resolve_path(path_or_repo: str, *, revision: Optional[str] = None) -> str:
    """A local checkpoint directory; Hub ids are downloaded (weights, configs, tokenizer; never code)."""
    path = os.path.expanduser(str(path_or_repo))
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json")
    if os.path.lexists(path):  # a link whose target is missing or loops back on itself
        raise CheckpointError(f"{path} is a symbolic link that leads nowhere (its target is missing, or the links "
                              "loop); pass the checkpoint directory itself")
    if is_local_path(path_or_repo):
        raise CheckpointError(f"no model directory at {path}")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(
            repo_id=str(path_or_repo),
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"],
        )
    except Exception as e:  # offline, unknown repo, auth: one clear message
        raise CheckpointError(
            f"no local directory {path_or_repo!r}, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            "If this machine is offline, download the checkpoint elsewhere and pass its directory."
        ) from None


def load_tokenizer(directory: str):
    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES):
        return None
    if not any(os.path.isfile(os.path.join(directory, f)) for f in TOKENIZER_FILES if f != "tokenizer_config.json"):
        # transformers would build a tokenizer of the few added tokens listed there, renumbered from 0
        raise CheckpointError(f"{directory} has tokenizer_config.json but no vocabulary (tokenizer.json, or vocab.json "
                              f"and merges.txt, or tokenizer.model); copy the tokenizer's files next to it")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # it warns that config.json's model_type is not a tokenizer's
    try:
        # trust_remote_code=False: an `auto_map` in tokenizer_config.json is never executed
        return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as e:
        raise CheckpointError(f"cannot load the tokenizer in {directory}: {type(e).__name__}: {e}") from None
    finally:
        hf_logging.set_verbosity(level)


def _refuse_apple_app_export(directory: str) -> None:
    """Apple's MLX/CoreML exports (for its iOS/macOS app) share config.json's LLaVA keys but not the weights."""
    names = os.listdir(directory)
    try:
        with open(os.path.join(directory, "config.json")) as f:
            quantized = "quantization" in json.load(f)
    except (OSError, ValueError):
        quantized = False
    if any(n.endswith(".mlpackage") for n in names) or quantized:
        what = ", ".join(n for n in names if n.endswith(".mlpackage")) or "an MLX-quantized config.json"
        raise CheckpointError(
            f"{directory} is an MLX/CoreML export of FastVLM for Apple's app ({what}), not a PyTorch checkpoint; "
            f"load the PyTorch weights instead: Apple's llava-fastvithd_*_stage3 folders or the Hugging Face "
            f"repositories apple/FastVLM-0.5B, -1.5B, -7B (without -fp16/-int8/-int4)")


def check_tokenizer(tokenizer, config, directory: str) -> None:
    """Refuse a tokenizer that cannot be this model's: more tokens than its vocabulary or no chat-frame tokens;
    warn when its <|im_end|> is not the config's eos (generation stops at the tokenizer's, the reference at the
    config's)."""
    n, vocab = len(tokenizer), int(config.text["vocab_size"])
    if n > vocab:
        raise CheckpointError(f"{directory}: the tokenizer has {n} tokens but the model's vocabulary is {vocab}; "
                              f"the tokenizer files belong to another model")
    ids = tokenizer.get_vocab()
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in ids]
    if missing:
        raise CheckpointError(f"{directory}: the tokenizer has no {' or '.join(missing)} token, which FastVLM's "
                              f"chat frame needs; are its files complete (vocab.json and merges.txt, or "
                              f"tokenizer.json)?")
    eos = config.text.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else [] if eos is None else [eos]
    if eos_ids and ids["<|im_end|>"] not in eos_ids:
        warnings.warn(f"{directory}: the tokenizer's <|im_end|> is id {ids['<|im_end|>']} but the model's config "
                      f"says eos_token_id {eos}; generation stops at the tokenizer's (the reference would stop at "
                      f"the config's). Are the tokenizer files this model's?", stacklevel=3)


def load_checkpoint(cls, path_or_repo, *, device=None, dtype=None, revision=None, progress=True, image_size=None):
    from ..model import resolve_device, resolve_dtype

    directory = resolve_path(path_or_repo, revision=revision)
    cfg_path = os.path.join(directory, "config.json")
    config, layout = _read_config(cfg_path, resolution_given=image_size is not None)
    if image_size is not None:
        config = config.with_image_size(int(image_size))
    tokenizer = load_tokenizer(directory)  # checked before the weights are read: they can be many GB
    if tokenizer is not None:
        check_tokenizer(tokenizer, config, directory)
    state = layout.to_internal(load_state_dict(directory, progress=progress))
    tied = LM_HEAD_KEY not in state
    config.text["tie_word_embeddings"] = tied
    if tied and EMBED_KEY in state:
        state[LM_HEAD_KEY] = state[EMBED_KEY]

    try:
        model = cls(config, init_weights=False)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        raise CheckpointError(f"{cfg_path}: cannot build a model from this config "
                              f"({type(e).__name__}: {e})") from None
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    try:
        check_keys(expected, state, source=f"{directory} ({layout.NAME} layout)",
                   floating=[k for k, v in own.items() if v.is_floating_point()])
    except CheckpointError:
        _refuse_apple_app_export(directory)
        raise
    model.load_state_dict(state, strict=True, assign=True)
    model._restore_nonpersistent_buffers()
    model._tie_if_needed()
    if tokenizer is not None:
        model.set_tokenizer(tokenizer)
    else:
        warnings.warn(f"{directory} has no tokenizer files; model.chat needs one (model.set_tokenizer)")
    device = resolve_device(device)
    model.to(device=device, dtype=resolve_dtype(dtype, device))
    model.checkpoint_layout = layout.NAME
    model.checkpoint_path = directory
    return model.eval()


def _fused_state(model) -> dict[str, torch.Tensor]:
    """The model's tensors with the encoder in its fused form (a fused copy if it is in train form)."""
    state = dict(model.state_dict())
    if not model.config.vision.inference_mode:
        tower = copy.deepcopy(model.vision_tower).reparameterize()
        state = {k: v for k, v in state.items() if not k.startswith("vision_tower.")}
        state.update({"vision_tower." + k: v for k, v in tower.state_dict().items()})
    return state


def save_checkpoint(model, directory: str, *, layout: str = "fastvlm", max_shard_size: Optional[int] = None) -> None:
    if layout not in LAYOUTS:
        raise CheckpointError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUT_NAMES)}")
    os.makedirs(directory, exist_ok=True)
    tied = bool(getattr(model.language_model.config, "tie_word_embeddings", False))
    config = copy.deepcopy(model.config)
    config.text["tie_word_embeddings"] = tied
    tokenizer = model.processor.tokenizer if model.processor is not None else None
    dtype = model.dtype
    if layout == "fastvlm":
        state = dict(model.state_dict())
        if tied:
            state.pop(LM_HEAD_KEY, None)
        save_state_dict(state, directory, max_shard_bytes=max_shard_size)
        config.save(os.path.join(directory, "config.json"))
    else:
        state = _fused_state(model)
        if tied:
            state.pop(LM_HEAD_KEY, None)
        config.vision = copy.deepcopy(config.vision)
        config.vision.inference_mode = True
        if layout == "apple":
            if config.vision.projection_dim is None:
                # Apple's MobileCLIP tower always stores its (unused) head; write zeros so the layout is complete.
                config.vision.projection_dim = 768 if config.vision.out_channels == 3072 else config.vision.out_channels // 4
                state["vision_tower.head.proj"] = torch.zeros(config.vision.out_channels, config.vision.projection_dim,
                                                              dtype=dtype)
            cfg = apple.from_config(config, config.text, dtype)
            save_state_dict(apple.from_internal(state), directory, max_shard_bytes=max_shard_size)
            atomic_write_json(os.path.join(directory, "config.json"), cfg)
            gen = {"bos_token_id": config.text.get("bos_token_id"), "do_sample": True,
                   "eos_token_id": config.text.get("eos_token_id"), "temperature": None, "top_p": None}
            atomic_write_json(os.path.join(directory, "generation_config.json"), gen)
        else:  # hf
            vocab = int(config.text["vocab_size"])
            if tokenizer is not None:
                tokenizer = copy.deepcopy(tokenizer)
                if "<image>" not in tokenizer.get_vocab():
                    tokenizer.add_tokens(["<image>"], special_tokens=True)
                image_token_id = int(tokenizer.convert_tokens_to_ids("<image>"))
            else:
                image_token_id = vocab
            if image_token_id >= vocab or vocab % 64:
                new_vocab = max(hf.padded_vocab(vocab), int(-(-(image_token_id + 1) // 64) * 64))
                state[EMBED_KEY] = hf.pad_vocab_rows(state[EMBED_KEY], new_vocab)
                if not tied:
                    state[LM_HEAD_KEY] = hf.pad_vocab_rows(state[LM_HEAD_KEY], new_vocab)
                vocab = new_vocab
            cfg = hf.from_config(config, config.text, image_token_id, vocab, dtype)
            save_state_dict(hf.from_internal(state), directory, max_shard_bytes=max_shard_size)
            atomic_write_json(os.path.join(directory, "config.json"), cfg)
            pre = {
                "image_processor_type": "CLIPImageProcessor",
                "crop_size": {"height": config.image_size, "width": config.image_size},
                "size": {"shortest_edge": config.image_size},
                "do_center_crop": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
                "do_convert_rgb": True, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
                "resample": 3, "rescale_factor": 1 / 255,
            }
            atomic_write_json(os.path.join(directory, "preprocessor_config.json"), pre)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
        if layout == "apple" and not apple.write_reference_tokenizer_files(tokenizer, directory, config.max_length):
            warnings.warn(f"{directory}: the tokenizer is not Qwen2's pipeline (NFC, Qwen2's split regex, byte-level "
                          "BPE), so only tokenizer.json was written, not the vocab.json/merges.txt files Apple's "
                          "folders have: transformers 4.x (the reference's runtime) may not load it", stacklevel=2)


def _hf_resolution_from_preprocessor(config, cfg: dict, path: str) -> None:
    """transformers' port runs at its image processor's crop size; config.json's image_seq_length is LLaVA's
    default (576, i.e. 1536 px) unless the checkpoint's maker set it. Where the two disagree, follow the processor."""
    if not os.path.isfile(path):
        return
    try:
        pre = load_config_file(path)
        crop = pre.get("crop_size") if pre.get("do_center_crop", True) else pre.get("size")
        side = crop.get("height", crop.get("shortest_edge")) if isinstance(crop, dict) else crop
        side = int(side)
    except (CheckpointError, ConfigError, AttributeError, TypeError, ValueError):
        return  # a processor config we cannot read says nothing about the resolution
    if side <= 0 or side % 64 or side == config.vision.image_size:
        return
    warnings.warn(f"{path} crops images to {side} px, but config.json's image_seq_length "
                  f"{cfg.get('image_seq_length')} means {config.vision.image_size} px; using {side} px, as "
                  f"transformers' port does (image_size= sets another)", stacklevel=5)
    config.vision.image_size = side


def _read_config(cfg_path: str, resolution_given: bool = False):
    """(FastVLMConfig, layout) from a config.json; a malformed one raises CheckpointError naming it."""
    cfg = load_config_file(cfg_path)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_path}: a config must be a JSON object, got {type(cfg).__name__}")
    layout = detect_layout(cfg, cfg_path)
    try:
        config = layout.to_config(cfg)
        if layout is hf and hf.EXTRA_VISION_KEY not in cfg and not resolution_given:
            _hf_resolution_from_preprocessor(config, cfg, os.path.join(os.path.dirname(cfg_path),
                                                                       "preprocessor_config.json"))
        return config, layout
    except CheckpointError as e:
        if cfg_path in str(e):
            raise
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except ConfigError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        # a section of the wrong type, a missing key, a value of the wrong type (transformers'
        # strict config classes raise ValueError subclasses)
        what = f"missing key {e}" if isinstance(e, KeyError) else f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{cfg_path}: not a valid {layout.NAME}-layout config ({what})") from None


def read_config(path_or_dir: str) -> tuple[FastVLMConfig, str]:
    """The FastVLMConfig and layout name of a checkpoint directory, without loading weights."""
    config, layout = _read_config(os.path.join(path_or_dir, "config.json"))
    return config, layout.NAME


def convert(src: str, dst: str, layout: str, *, dtype=None, max_shard_size: Optional[int] = None) -> list[str]:
    """Convert a checkpoint directory into `layout`, keeping its dtype unless one is given; returns notes on
    what the target layout cannot hold (for the user to read)."""
    from ..model import FastVLM

    directory = resolve_path(src)
    dtypes = tensor_dtypes(directory)  # from the headers: the weights are read once, by from_pretrained
    float_dtypes = {float_dtype(d) for d in dtypes.values()} - {None}
    has_head = any(k.endswith("head.proj") and "vision_tower" in k for k in dtypes)
    keep = dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
    model = FastVLM.from_pretrained(directory, device="cpu", dtype=keep)
    model.save_pretrained(dst, layout=layout, max_shard_size=max_shard_size)
    notes = []
    if layout == "apple" and not has_head:
        notes.append("the apple layout always holds MobileCLIP's head (vision_tower head.proj, unused by FastVLM); "
                     "the source has none, so an all-zero one was written (converting back keeps it)")
    if layout == "hf" and has_head:
        notes.append("the hf layout has no place for Apple's MobileCLIP head (vision_tower head.proj, unused by "
                     "FastVLM; transformers' port deletes it too): it was dropped")
    return notes


__all__ = ["LAYOUTS", "LAYOUT_NAMES", "detect_layout", "resolve_path", "load_checkpoint", "save_checkpoint",
           "read_config", "convert", "load_tokenizer"]
