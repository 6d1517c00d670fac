"""pixtral-cpp: Mistral's Pixtral 12B on llama.cpp."""

from __future__ import annotations

from typing import Any

from pixtral_cpp.errors import PixtralError

__version__ = "0.1.0"

_LAZY = {
    "PixtralModel": "pixtral_cpp.model",
    "ModelOptions": "pixtral_cpp.options",
    "GenerationOptions": "pixtral_cpp.options",
    "Message": "pixtral_cpp.conversation",
    "Completion": "pixtral_cpp.results",
    "GenerationStats": "pixtral_cpp.results",
    "TextChunk": "pixtral_cpp.results",
    "CancelToken": "pixtral_cpp.control",
    "ProgressEvent": "pixtral_cpp.control",
    "ModelBusyError": "pixtral_cpp.model",
}

__all__ = ["PixtralError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    """The public API, imported on first use so `import pixtral_cpp` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pixtral_cpp' has no attribute {name!r}")
