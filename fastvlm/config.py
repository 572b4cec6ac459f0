"""Configuration dataclasses and presets.

The architecture is data: the full-size FastViTHD of the released models and the
small encoders used by tests and the bundled model are the same code with other
numbers here.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .errors import CheckpointError, ConfigError

IMAGE_TOKEN = "<image>"
# The reference's sentinel for an image slot in input_ids. It is never a real token id,
# so it cannot collide with the vocabulary; the model replaces these positions with
# projected image features before the language model sees them.
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100


# The largest input side accepted (256x256 = 65,536 visual tokens at stride 64); the released models use 1024.
MAX_IMAGE_SIZE = 16384
# No FastVLM comes near this; a config.json describing more is corrupt (it would allocate terabytes).
MAX_TEXT_PARAMETERS = 200e9


@dataclass
class VisionConfig:
    """FastViTHD hyper-parameters (defaults: the encoder of the released models)."""

    image_size: int = 1024
    depths: tuple[int, ...] = (2, 12, 24, 4, 2)
    embed_dims: tuple[int, ...] = (96, 192, 384, 768, 1536)
    mlp_ratios: tuple[float, ...] = (4.0, 4.0, 4.0, 4.0, 4.0)
    token_mixers: tuple[str, ...] = ("repmixer", "repmixer", "repmixer", "attention", "attention")
    # RepCPE (7x7 conditional positional encoding) before each stage that has True here
    pos_embs: tuple[bool, ...] = (False, False, False, True, True)
    head_dim: int = 32
    # conv_exp widens the last stage by this factor (FastViT's cls_ratio)
    expansion_ratio: float = 2.0
    # Size of MobileCLIP's unused GlobalPool2D head (`head.proj`); None: no head.
    projection_dim: Optional[int] = 768
    repmixer_kernel_size: int = 3
    down_patch_size: int = 7
    pos_emb_kernel_size: int = 7
    layer_scale_init_value: float = 1e-5
    norm_eps: float = 1e-5
    # True: build the fused (reparameterised) form the released checkpoints store.
    # False: the train-time multi-branch form; `reparameterize()` turns it into the fused one.
    inference_mode: bool = True

    def __post_init__(self) -> None:
        # the scalar fields take their annotated types (a JSON "256" for image_size is refused here, not
        # left to fail deep in the model's construction)
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), str(f.type)
            want = {"int": int, "float": (int, float), "bool": bool}.get(kind.removeprefix("Optional[").rstrip("]"))
            if want is None or (value is None and kind.startswith("Optional[")):
                continue
            if not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
                raise ConfigError(f"vision.{f.name} must be {kind}, got {value!r}")
        for name in ("depths", "embed_dims", "mlp_ratios", "token_mixers", "pos_embs"):
            if not isinstance(getattr(self, name), (list, tuple)):
                raise ConfigError(f"vision.{name} must be a list, got {getattr(self, name)!r}")
            setattr(self, name, tuple(getattr(self, name)))
        n = len(self.depths)
        for name in ("embed_dims", "mlp_ratios", "token_mixers", "pos_embs"):
            if len(getattr(self, name)) != n:
                raise ConfigError(f"vision.{name} has {len(getattr(self, name))} entries, depths has {n}")
        for name in ("depths", "embed_dims"):
            for i, v in enumerate(getattr(self, name)):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise ConfigError(f"vision.{name}[{i}] must be a positive int, got {v!r}")
        for i, v in enumerate(self.mlp_ratios):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < float("inf"):
                raise ConfigError(f"vision.mlp_ratios[{i}] must be a positive number, got {v!r}")
        for name in ("head_dim", "repmixer_kernel_size", "down_patch_size", "pos_emb_kernel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"vision.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.expansion_ratio < float("inf"):
            raise ConfigError(f"vision.expansion_ratio must be a positive number, got {self.expansion_ratio}")
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(f"vision.projection_dim must be a positive int or null, got {self.projection_dim}")
        if not self.patch_size <= self.image_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"vision.image_size must be from {self.patch_size} to {MAX_IMAGE_SIZE} pixels, got "
                              f"{self.image_size} (the released models use 1024)")
        for m in self.token_mixers:
            if m not in ("repmixer", "attention"):
                raise ConfigError(f"vision.token_mixers: unknown mixer {m!r} (expected 'repmixer' or 'attention')")
        for i, d in enumerate(self.embed_dims):
            if self.token_mixers[i] == "attention" and d % self.head_dim:
                raise ConfigError(f"vision.embed_dims[{i}]={d} is not a multiple of head_dim={self.head_dim}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size={self.image_size} is not a multiple of the encoder's stride {self.patch_size}"
            )

    @property
    def patch_size(self) -> int:
        """Total downsampling: 4 in the stem, then 2 per patch embedding between stages."""
        return 4 * 2 ** (len(self.depths) - 1)

    @property
    def out_channels(self) -> int:
        return int(self.embed_dims[-1] * self.expansion_ratio)

    def num_tokens(self, image_size: Optional[int] = None) -> int:
        side = (image_size or self.image_size) // self.patch_size
        return side * side


def mlp_depth(projector_type: str) -> int:
    """Linear layers of an ``mlp<N>x_gelu`` projector; 0 for the reference's other types, 'linear' and 'identity'."""
    if projector_type in ("linear", "identity"):
        return 0
    m = re.fullmatch(r"mlp(\d+)x_gelu", str(projector_type))
    if not m or int(m.group(1)) < 1:
        raise ConfigError(f"unknown projector_type {projector_type!r}: the reference's are 'linear', 'identity' and "
                          f"'mlp<N>x_gelu' (N >= 1; released FastVLM checkpoints use 'mlp2x_gelu')")
    return int(m.group(1))


@dataclass
class FastVLMConfig:
    """A whole FastVLM: encoder, projector and the Hugging Face causal LM's config."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    # Keyword arguments of the language model's transformers config (model_type selects the class).
    text: dict[str, Any] = field(default_factory=dict)
    projector_type: str = "mlp2x_gelu"
    # How images are made square before resizing: "pad" (reference) or "crop" (HF card / iOS app).
    image_aspect_ratio: str = "pad"
    system_prompt: str = "You are a helpful assistant."
    # Truncation length the reference applies to spliced sequences.
    max_length: int = 8192

    def __post_init__(self) -> None:
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if not isinstance(self.vision, VisionConfig):
            raise ConfigError(f"vision must be a mapping of encoder settings, got {self.vision!r}")
        if not isinstance(self.text, dict):
            raise ConfigError(f"text must be a mapping (the language model's config), got {self.text!r}")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                               "vocab_size") if k not in self.text]
        if missing:
            raise ConfigError(f"text (the language model's config) lacks {', '.join(missing)}")
        sizes = {}
        for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            v = self.text[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"text.{k} (the language model's {k}) must be a positive int, got {v!r}")
            sizes[k] = v
        h = sizes["hidden_size"]
        params = sizes["vocab_size"] * h * 2 + sizes["num_hidden_layers"] * (4 * h * h + 3 * h * sizes["intermediate_size"])
        if params > MAX_TEXT_PARAMETERS:
            raise ConfigError(f"text describes a language model of about {params / 1e9:,.0f} B parameters "
                              f"(hidden_size {h}, {sizes['num_hidden_layers']} layers, vocab_size "
                              f"{sizes['vocab_size']}); more than {MAX_TEXT_PARAMETERS / 1e9:.0f} B is taken for a "
                              "corrupt config")
        mlp_depth(self.projector_type)  # raises ConfigError for a type the reference's builder does not know
        if self.image_aspect_ratio not in ("pad", "crop"):
            raise ConfigError(f"image_aspect_ratio must be 'pad' or 'crop', got {self.image_aspect_ratio!r}")
        self.text = dict(self.text)
        self.text.setdefault("model_type", "qwen2")

    @property
    def hidden_size(self) -> int:
        return int(self.text["hidden_size"])

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens()

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["vision"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["vision"].items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FastVLMConfig":
        d = copy.deepcopy(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - {"model_type", "fastvlm_version", "format"}
        if unknown:
            raise ConfigError(f"unknown FastVLM config fields: {sorted(unknown)}")
        vision = d.pop("vision", {})
        if not isinstance(vision, dict):
            raise ConfigError(f"vision must be a mapping of encoder settings, got {vision!r}")
        vknown = {f.name for f in dataclasses.fields(VisionConfig)}
        vunknown = set(vision) - vknown
        if vunknown:
            raise ConfigError(f"unknown vision config fields: {sorted(vunknown)}")
        return cls(vision=VisionConfig(**vision), **{k: v for k, v in d.items() if k in known and k != "vision"})

    def save(self, path: str) -> None:
        from . import __version__

        d = {"model_type": "fastvlm", "format": "fastvlm", "fastvlm_version": __version__, **self.to_dict()}
        with open(path, "w") as f:
            json.dump(d, f, indent=2)
            f.write("\n")

    def replace(self, **changes: Any) -> "FastVLMConfig":
        return dataclasses.replace(copy.deepcopy(self), **changes)

    def with_image_size(self, image_size: int) -> "FastVLMConfig":
        new = copy.deepcopy(self)
        new.vision = dataclasses.replace(new.vision, image_size=image_size)
        return new


# Qwen2 settings shared by all three released sizes.
_QWEN2_COMMON = dict(
    model_type="qwen2",
    hidden_act="silu",
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    use_sliding_window=False,
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
    pad_token_id=151643,
    tie_word_embeddings=False,
)


def _qwen2(hidden, layers, heads, kv_heads, intermediate, vocab, **kw):
    return dict(
        _QWEN2_COMMON,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        vocab_size=vocab,
        max_window_layers=layers,
        **kw,
    )


def _presets() -> dict[str, FastVLMConfig]:
    return {
        # The released architectures (reference doc §6); weights come from checkpoints.
        "fastvlm-0.5b": FastVLMConfig(text=_qwen2(896, 24, 14, 2, 4864, 151936, tie_word_embeddings=False)),
        "fastvlm-1.5b": FastVLMConfig(text=_qwen2(1536, 28, 12, 2, 8960, 151936)),
        "fastvlm-7b": FastVLMConfig(text=_qwen2(3584, 28, 28, 4, 18944, 152064)),
        # A very small model for unit tests: every block type, seconds on a CPU.
        "fastvlm-tiny": FastVLMConfig(
            vision=VisionConfig(
                image_size=128,
                depths=(1, 1, 1, 1, 1),
                embed_dims=(16, 32, 64, 64, 128),
                token_mixers=("repmixer", "repmixer", "repmixer", "attention", "attention"),
                pos_embs=(False, False, False, True, True),
                head_dim=16,
                projection_dim=32,
            ),
            text=_qwen2(64, 2, 4, 2, 128, 512, bos_token_id=None, eos_token_id=2, pad_token_id=0,
                        max_position_embeddings=4096),
        ),
    }


PRESETS = _presets()


def get_preset(name: str) -> FastVLMConfig:
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(sorted(PRESETS))}") from None


def load_config_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        if os.path.isfile(os.path.join(folder, "trainer_state.json")):
            raise CheckpointError(f"no config.json at {path}: {folder} is a training checkpoint (a step folder); "
                                  "load its run's final/ folder, or continue the run with fastvlm train --resume")
        raise CheckpointError(f"no config.json at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text, so not a JSON config ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
