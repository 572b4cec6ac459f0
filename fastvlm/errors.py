"""Exceptions with messages that name the problem.

Every error the package raises on bad input is a FastVLMError (also a ValueError, so
callers that catch ValueError keep working); the CLI and the server turn them into a
one-line message or a 4xx response instead of a traceback.
"""


class FastVLMError(ValueError):
    """Base class of the package's own errors."""


class ConfigError(FastVLMError):
    """A configuration value or file is invalid."""


class CheckpointError(FastVLMError):
    """A checkpoint is missing, malformed, or does not match the model."""


class ImageError(FastVLMError):
    """An image could not be read or is not acceptable."""


class ImageTooLargeError(ImageError):
    """An image refused for its pixel count (a possible decompression bomb), by our limit or PIL's."""


class PromptError(FastVLMError):
    """A prompt or message list is malformed (e.g. images and <image> placeholders disagree)."""


# Optional packages and the pyproject extra that installs each, so that a command needing a missing one can say
# how to get it in one line (the CLI's handler, bench's skipped baselines) instead of a traceback.
OPTIONAL_PACKAGES = {
    "fastapi": "serve", "uvicorn": "serve", "httpx": "serve",
    "matplotlib": "bench", "psutil": "bench", "timm": "bench",
    "accelerate": "train", "peft": "train",
    "lmms_eval": "lmms",
}


def install_hint(extra: str) -> str:
    """The command that installs one of the package's optional extras, from an index or in a checkout."""
    return f"pip install 'fastvlm[{extra}]' (in a checkout: pip install -e \".[{extra}]\")"


def missing_package_hint(error: ModuleNotFoundError) -> "str | None":
    """"the optional package 'X', which is not installed: pip install ..." for a missing optional package, or
    None for any other missing module (a real defect, left to raise)."""
    root = (error.name or "").split(".")[0]
    extra = OPTIONAL_PACKAGES.get(root)
    if extra is None:
        return None
    return f"the optional package '{root}', which is not installed: {install_hint(extra)}"


# The way out of a damaged training checkpoint, said by every error that finds one.
EARLIER_STEP_HINT = "resume from an earlier step folder (--resume PATH)"
