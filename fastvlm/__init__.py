"""fastvlm: a faithful, fast PyTorch implementation of Apple's FastVLM."""

__version__ = "0.1.0"

from .config import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, PRESETS, FastVLMConfig, VisionConfig, get_preset  # noqa: E402
from .errors import CheckpointError, ConfigError, FastVLMError, ImageError, ImageTooLargeError, PromptError  # noqa: E402


def __getattr__(name):
    # Heavy modules (torch, transformers) load on first use so `import fastvlm` stays cheap.
    if name == "FastVLM":
        from .model import FastVLM

        return FastVLM
    if name == "FastVLMProcessor":
        from .processing import FastVLMProcessor

        return FastVLMProcessor
    if name == "FastViTHD":
        from .vision import FastViTHD

        return FastViTHD
    if name == "load_image":
        from .processing import load_image

        return load_image
    if name == "bundled_model_path":
        from .commands.common import bundled_model_path

        return bundled_model_path
    raise AttributeError(f"module 'fastvlm' has no attribute {name!r}")


__all__ = [
    "FastVLM",
    "FastVLMProcessor",
    "FastViTHD",
    "load_image",
    "bundled_model_path",
    "FastVLMConfig",
    "VisionConfig",
    "PRESETS",
    "get_preset",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "FastVLMError",
    "ConfigError",
    "CheckpointError",
    "ImageError",
    "ImageTooLargeError",
    "PromptError",
]
