"""pixtral-cpp: Mistral's Pixtral 12B on llama.cpp."""

from __future__ import annotations

from pixtral_cpp.errors import PixtralError

__version__ = "0.1.0"

__all__ = ["PixtralError", "__version__"]
