"""Domain exceptions: every failure a user can act on derives from PixtralError."""

from __future__ import annotations


class PixtralError(Exception):
    """Base class; the CLI turns it into a one-line message and exit code 1."""


class CheckpointError(PixtralError):
    """The source checkpoint is not a usable Pixtral checkpoint (layout, config, tensors)."""


class UnsupportedCheckpointError(CheckpointError):
    """The folder or repo holds something other than Pixtral in a layout we know."""


class ConfigError(CheckpointError):
    """A config key is missing, has the wrong type or contradicts another."""


class TensorError(CheckpointError):
    """A tensor is missing, unknown, duplicated, truncated or of the wrong shape."""


class TokenizerError(CheckpointError):
    """The tokenizer files are missing or unreadable."""


class QuantizationError(PixtralError):
    """An unknown or unsupported quantization type, or the quantizer failed."""


class OutputError(PixtralError):
    """The output cannot be written: it exists, the folder is unwritable, or the disk is too small."""


class ModelError(PixtralError):
    """A GGUF file is missing, truncated, not a GGUF, or the pair does not match."""


class ImageError(PixtralError):
    """An image cannot be read or is unsafe to decode."""


class BackendError(PixtralError):
    """llama.cpp could not be loaded or refused an operation."""


class ContextLengthError(PixtralError):
    """The prompt and its images do not fit in the context."""


class ConversationError(PixtralError):
    """A chat conversation Pixtral's format cannot express (unknown role or part, nothing to answer)."""


class OptionsError(PixtralError, ValueError):
    """An option of ModelOptions or GenerationOptions out of range; the message names it and its value.

    Also a ValueError, what these checks raised before they had a domain error."""


class ServerConfigError(OptionsError):
    """A server setting that cannot work; the message names it."""


class UnsafeBindError(PixtralError):
    """The server would listen beyond this machine without an API key."""


class ServerBusyError(PixtralError):
    """The server cannot take the request now: too many are waiting or running; retrying later may work."""


class ServerShuttingDownError(ServerBusyError):
    """The server is stopping: the running generation was ended and waiting requests are refused."""


class EndpointError(PixtralError):
    """A remote batch cannot go on: every server it was given was dropped (the message says why for each)."""
