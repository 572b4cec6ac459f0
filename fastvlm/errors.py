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
