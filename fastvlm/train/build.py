"""Model, freezing, LoRA, optimizer parameter groups and the learning-rate schedule of a recipe."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from typing import Any, Optional

import torch
from torch import nn

from ..config import FastVLMConfig, VisionConfig, get_preset
from ..errors import CheckpointError, ConfigError
from .recipe import MODULES, Recipe

logger = logging.getLogger("fastvlm.train")

# Name components that wrappers (FSDP1, activation checkpointing, torch.compile) insert into
# parameter names; dropped to find which module a parameter belongs to.
_WRAPPER_COMPONENTS = {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"}


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(directory):
        raise ConfigError(f"tokenizer directory not found: {directory}")
    try:
        return AutoTokenizer.from_pretrained(directory, use_fast=True, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"cannot load the tokenizer in {directory}: {type(e).__name__}: {e}") from None


def _text_config_from_lm(lm) -> dict:
    d = lm.config.to_diff_dict()
    for k in ("architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "auto_map",
              "_attn_implementation_autoset"):
        d.pop(k, None)
    d["model_type"] = lm.config.model_type
    return d


def _round_up(n: int, k: int = 64) -> int:
    return -(-n // k) * k


def _check_text_keys(given: dict, base: dict) -> None:
    """init.text keys must be Qwen2Config's: transformers would keep a misspelt one as an unused attribute."""
    from difflib import get_close_matches

    from transformers import Qwen2Config

    # plus what Qwen2's modules read with getattr, and the keys other transformers versions spell differently
    known = set(Qwen2Config().to_dict()) | set(base) | {"rope_theta", "rope_scaling", "rope_parameters", "head_dim",
                                                         "partial_rotary_factor", "torch_dtype", "dtype"}
    unknown = sorted(set(given) - known)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise ConfigError(f"init.text: unknown keys {', '.join(hints)}; the keys are Qwen2Config's "
                          "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, ...)")


def build_config(recipe: Recipe, tokenizer, lm=None) -> FastVLMConfig:
    """The FastVLMConfig of a new model (recipe `init`)."""
    init = recipe.init
    config = get_preset(init.preset)
    vision = dataclasses.asdict(config.vision)
    unknown = set(init.vision) - set(vision)
    if unknown:
        raise ConfigError(f"init.vision: unknown keys {sorted(unknown)}; valid: {', '.join(vision)}")
    vision.update(init.vision)
    if recipe.data.image_size is not None:
        vision["image_size"] = recipe.data.image_size
    config.vision = VisionConfig(**vision)
    text = _text_config_from_lm(lm) if lm is not None else dict(config.text)
    _check_text_keys(init.text, text)
    text.update(init.text)
    vocab_needed = len(tokenizer)
    if "vocab_size" not in init.text and lm is None:
        text["vocab_size"] = max(_round_up(vocab_needed), 64)
    if int(text["vocab_size"]) < vocab_needed:
        raise ConfigError(f"the language model's vocab_size {text['vocab_size']} is smaller than the tokenizer "
                          f"({vocab_needed} tokens)")
    # (FastVLM.from_config takes the pad/eos/bos ids from the tokenizer.)
    config.text = text
    if recipe.data.max_length is not None:
        config.max_length = recipe.data.max_length
    return FastVLMConfig.from_dict(config.to_dict())


def encoder_weights(state: dict) -> dict:
    """The encoder's entries of `state` under the encoder's own names: a whole model's file (this project's,
    Apple's, the hf port's) loses its prefix; an encoder-only file comes back as it is."""
    for prefix in ("model.vision_tower.vision_tower.model.", "vision_tower.vision_tower.model.",
                   "model.vision_tower.timm_model.", "vision_tower.timm_model.", "vision_tower.", "model.",
                   "timm_model."):
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


# An export's multi-branch encoder, beside the fused weights the checkpoint layouts hold (train form: the
# MobileOne/RepMixer branches before reparameterisation). In a subdirectory, so no loader mistakes it for a shard.
TRAIN_FORM_FILE = os.path.join("train_form", "vision_tower.safetensors")


def train_form_encoder_state(model) -> Optional[dict]:
    """The model's encoder in its multi-branch form, if it has one: its own weights while it is unfused, else
    the multi-branch weights it was fused from at load (`build_model` keeps those only for a frozen encoder)."""
    if not model.config.vision.inference_mode:
        return {k: v.detach().cpu().clone() for k, v in model.vision_tower.state_dict().items()}
    return getattr(model, "_train_form_encoder", None)


def use_train_form_encoder(model, path: str, train: bool) -> None:
    """The multi-branch form in `path` of the fused encoder of `model`, checked to fuse to exactly the weights the
    model loaded (so it is that encoder, not another one). `train`: the model's encoder becomes it; else the
    fused one stays and the branches are kept for the export (the encoder is frozen, so they still hold)."""
    from safetensors.torch import load_file

    from ..checkpoints.io import check_keys
    from ..vision import FastViTHD

    branches = FastViTHD(dataclasses.replace(model.config.vision, inference_mode=False),
                         attn_impl=model.vision_tower.attn_impl)
    try:
        state = load_file(path)
        expected = {k: tuple(v.shape) for k, v in branches.state_dict().items()}
        check_keys(expected, state, source=f"{path} (encoder, train form)")
    except Exception as e:  # noqa: BLE001 - safetensors and check_keys raise their own types
        raise ConfigError(f"{path} is not this model's multi-branch encoder ({e}); delete the train_form folder to "
                          "train the fused encoder") from None
    branches.load_state_dict(state)
    fused = copy.deepcopy(branches).eval().reparameterize().state_dict()
    for k, v in model.vision_tower.state_dict().items():
        if k not in fused or not torch.allclose(fused[k], v.to(fused[k].dtype), rtol=1e-4, atol=1e-6):
            raise ConfigError(f"{path} does not fuse to the encoder in {os.path.dirname(os.path.dirname(path))} "
                              f"(first difference: {k}); the two were not saved together. Delete the train_form "
                              "folder to train the fused encoder")
    if not train:
        model._train_form_encoder = state
        return
    model.vision_tower = branches.to(next(model.vision_tower.parameters()).device)
    model.config.vision = branches.config
    logger.info("the encoder trains in its multi-branch form (%s)", path)


def _load_vision_weights(model, path: str) -> None:
    """Encoder weights from safetensors (a file or a directory) with fastvlm/Apple or timm key names."""
    from safetensors.torch import load_file

    from ..checkpoints.io import check_keys, load_state_dict
    from ..checkpoints.timm_keys import timm_to_apple

    if os.path.isdir(path):
        state = load_state_dict(path, progress=False)
    elif os.path.isfile(path):
        from safetensors import SafetensorError

        try:
            state = load_file(path)
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"init.vision_tower: {path} is not a readable safetensors file ({e})") from None
    else:
        raise ConfigError(f"init.vision_tower: no such file or directory: {path}")
    state = encoder_weights(state)
    if any(k.startswith(("stem.", "stages.", "final_conv.")) for k in state):
        state = timm_to_apple(state, model.config.vision)
    train_form = any(p in k for k in state for p in (".rbr_conv.", ".rbr_skip.", ".rbr_scale.", ".lkb_origin."))
    if train_form and model.config.vision.inference_mode:
        # Multi-branch (train-time) weights for a fused encoder: load them into the train form, then fuse.
        from ..vision import FastViTHD

        donor = FastViTHD(dataclasses.replace(model.config.vision, inference_mode=False))
        expected = {k: tuple(v.shape) for k, v in donor.state_dict().items()}
        ignore = [k for k in expected if k.startswith("head.") and k not in state]
        ignore += [k for k in state if k.endswith("num_batches_tracked") and k not in expected]
        check_keys(expected, state, source=f"{path} (encoder, train form)", ignore=ignore)
        donor.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
        # kept for the export's train_form/ copy, from which a later stage that trains the encoder starts
        model._train_form_encoder = {k: v.detach().clone() for k, v in donor.state_dict().items()}
        state = donor.eval().reparameterize().state_dict()
    elif not train_form and not model.config.vision.inference_mode and any(".reparam_conv." in k for k in state):
        raise ConfigError(f"init.vision_tower: {path} holds a fused encoder, which cannot be split back into "
                          "train-time branches; set init.vision.inference_mode: true")
    expected = {k: tuple(v.shape) for k, v in model.vision_tower.state_dict().items()}
    # MobileCLIP's projection head is unused by FastVLM; keep the random one when absent.
    ignore = [k for k in expected if k.startswith("head.") and k not in state]
    ignore += [k for k in state if k.endswith("num_batches_tracked") and k not in expected]
    check_keys(expected, state, source=f"{path} (encoder)", ignore=ignore)
    state = {k: v for k, v in state.items() if k in expected}
    model.vision_tower.load_state_dict(state, strict=False)


def build_model(recipe: Recipe):
    """The model the recipe trains, on the CPU in float32 (master weights), with its tokenizer."""
    from ..model import FastVLM

    if recipe.model is not None:
        try:
            model = FastVLM.from_pretrained(recipe.model, device="cpu", dtype=torch.float32, progress=False,
                                            image_size=recipe.data.image_size)
        except CheckpointError as e:
            raise ConfigError(f"model: {e}") from None
        if recipe.tokenizer is not None:
            model.set_tokenizer(load_tokenizer(recipe.tokenizer))
        if model.processor is None:
            raise ConfigError(f"{recipe.model} has no tokenizer files; add `tokenizer: DIR` to the recipe")
        if recipe.data.max_length is not None:
            model.config.max_length = recipe.data.max_length
        train_form = os.path.join(recipe.model, TRAIN_FORM_FILE)
        if os.path.isfile(train_form):
            use_train_form_encoder(model, train_form, train=recipe.trainable_modules()["vision_tower"])
        return model

    init = recipe.init
    lm = None
    if init.language_model is not None:
        from transformers import AutoModelForCausalLM

        # a missing local path is said so plainly (transformers would call it an invalid repo id)
        from ..checkpoints import is_local_path

        if is_local_path(init.language_model) and not os.path.isdir(os.path.expanduser(str(init.language_model))):
            raise ConfigError(f"init.language_model: no model directory at {init.language_model}")
        try:
            lm = AutoModelForCausalLM.from_pretrained(init.language_model, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"init.language_model: cannot load {init.language_model}: "
                              f"{type(e).__name__}: {e}") from None
    tokenizer = load_tokenizer(recipe.tokenizer or init.language_model)
    config = build_config(recipe, tokenizer, lm)
    model = FastVLM.from_config(config, tokenizer=tokenizer, device="cpu", dtype=torch.float32, seed=init.seed)
    if lm is not None:
        missing, unexpected = model.language_model.load_state_dict(lm.state_dict(), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.text.get("tie_word_embeddings")]
        if missing or unexpected:
            raise ConfigError(f"init.language_model does not match the built LLM: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
        model._tie_if_needed()
        del lm
    if init.vision_tower is not None:
        _load_vision_weights(model, init.vision_tower)
        if recipe.trainable_modules()["vision_tower"]:  # the branches it kept would be stale after training
            model.__dict__.pop("_train_form_encoder", None)
    elif not recipe.trainable_modules()["vision_tower"]:
        logger.warning(
            "init.vision_tower is not set and this stage keeps the encoder frozen: it stays at its random "
            "initialisation, so the model learns from features that carry little of the image. Give pretrained "
            "encoder weights with --set init.vision_tower=PATH (scripts/train_bundled_model.sh shows how the "
            "bundled model's were made), or start from a model with --set model=DIR")
    return model


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


def apply_lora(model, recipe: Recipe) -> None:
    """Wrap the language model with peft LoRA adapters on its attention and MLP linears."""
    from peft import LoraConfig, get_peft_model

    targets = list(recipe.lora.target_modules)
    names = [n for n, _ in model.language_model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:  # peft refuses only when none matches
        leaf = sorted({n.rsplit(".", 1)[-1] for n, m in model.language_model.named_modules()
                       if isinstance(m, nn.Linear)})
        raise ConfigError(f"lora.target_modules: {unmatched} match no module of the language model; its linear "
                          f"layers are {', '.join(leaf)}")
    cfg = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                     target_modules=targets, bias="none", task_type="CAUSAL_LM")
    try:
        model.language_model = get_peft_model(model.language_model, cfg)
    except ValueError as e:
        raise ConfigError(f"lora.target_modules: {e}") from None


def is_lora(model) -> bool:
    return type(model.language_model).__module__.startswith("peft")


def apply_stage(model, recipe: Recipe) -> dict[str, bool]:
    """Freeze/unfreeze per the recipe's stage; LoRA adapters are added for stage `lora`.

    stage1: projector only (encoder and LLM frozen). stage1.5 / stage2: everything.
    lora: the LLM's LoRA adapters and the projector (the encoder if lora.train_vision_tower).
    The encoder's MobileCLIP projection head is never used by FastVLM and always stays frozen.
    """
    trainable = recipe.trainable_modules()
    model.requires_grad_(False)
    if recipe.stage == "lora":
        apply_lora(model, recipe)  # peft marks only the adapters trainable
        if not trainable["language_model"]:
            model.language_model.requires_grad_(False)
    else:
        model.language_model.requires_grad_(trainable["language_model"])
    model.mm_projector.requires_grad_(trainable["mm_projector"])
    model.vision_tower.requires_grad_(trainable["vision_tower"])
    head = getattr(model.vision_tower, "head", None)
    if head is not None:
        head.requires_grad_(False)
    return trainable


def enable_gradient_checkpointing(model, recipe: Recipe) -> None:
    if recipe.train.gradient_checkpointing:
        lm = model.language_model
        kwargs = {"use_reentrant": False}
        if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name warns there
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        lm.config.use_cache = False
    if recipe.train.vision_gradient_checkpointing:
        model.vision_tower.set_grad_checkpointing(True)


def set_train_mode(model, recipe: Recipe) -> None:
    """train() everywhere, except a frozen encoder (and, if asked, its BatchNorm statistics).

    The frozen LLM of stage 1 stays in train mode: Qwen2 has no dropout, and transformers
    only checkpoints activations of modules in train mode.
    """
    model.train()
    trainable = recipe.trainable_modules()
    if not trainable["vision_tower"]:
        model.vision_tower.eval()
    elif recipe.train.freeze_bn_stats:
        for m in model.vision_tower.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def clean_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_COMPONENTS)


def module_of(name: str) -> str:
    name = clean_name(name)
    if name.startswith("vision_tower."):
        return "vision_tower"
    if name.startswith("mm_projector."):
        return "mm_projector"
    return "language_model"


def _no_decay_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        cls = type(module).__name__
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or "Norm" in cls:
            ids.update(id(p) for p in module.parameters(recurse=False))
    return ids


def param_groups(model: nn.Module, recipe: Recipe) -> list[dict[str, Any]]:
    """AdamW groups: one per (module, decay) with the module's learning rate; no decay on biases and norms."""
    no_decay = _no_decay_ids(model)
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (id(p) in no_decay or clean_name(name).endswith(".bias") or p.ndim == 0)
        groups.setdefault((module_of(name), decay), []).append(p)
    out = []
    for module in MODULES:
        for decay in (True, False):
            params = groups.get((module, decay))
            if params:
                out.append({"params": params, "lr": recipe.module_lr(module),
                            "weight_decay": recipe.optim.weight_decay if decay else 0.0,
                            "name": module + ("" if decay else ".no_decay")})
    if not out:
        raise ConfigError("no trainable parameters")
    return out


def build_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    o = recipe.optim
    groups = param_groups(model, recipe)
    kwargs = dict(betas=tuple(o.betas), eps=o.eps)
    if any(p.is_cuda for g in groups for p in g["params"]):
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    if recipe.optim.warmup_steps is not None:
        return int(recipe.optim.warmup_steps)
    return math.ceil(recipe.optim.warmup_ratio * total_steps)


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based), as HF's schedules."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer, recipe: Recipe, total_steps: int):
    warm = warmup_steps(recipe, total_steps)
    schedule, min_ratio = recipe.optim.schedule, recipe.optim.min_lr_ratio

    def factor(step: int) -> float:
        return lr_factor(step, total=total_steps, warmup=warm, schedule=schedule, min_ratio=min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def merged_for_export(model) -> Any:
    """The model with LoRA merged into the LLM's weights (in place) and the encoder fused."""
    if is_lora(model):
        model.language_model = model.language_model.merge_and_unload()
    model.eval()
    model.reparameterize()
    return model


def trainable_summary(model) -> dict[str, int]:
    out = {m: 0 for m in MODULES}
    def numel(p) -> int:  # DeepSpeed ZeRO-3 leaves an empty shard in place and the full size in ds_numel
        return int(getattr(p, "ds_numel", p.numel()))

    for name, p in model.named_parameters():
        if p.requires_grad:
            out[module_of(name)] += numel(p)
    out["trainable"] = sum(out[m] for m in MODULES)  # the parts above, added up
    out["total"] = sum(numel(p) for p in model.parameters())  # every parameter, trainable or not
    return out


__all__ = [
    "apply_lora", "apply_stage", "build_config", "build_model", "build_optimizer", "build_scheduler",
    "enable_gradient_checkpointing", "is_lora", "load_tokenizer", "lr_factor", "merged_for_export", "module_of",
    "param_groups", "set_train_mode", "trainable_summary", "warmup_steps",
]
