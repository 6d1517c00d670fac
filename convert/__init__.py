"""Pixtral checkpoint (Mistral or transformers layout) -> llama.cpp GGUF text model + mmproj."""

from __future__ import annotations

from pixtral_cpp.convert.pipeline import (
                                          ConversionPlan,
                                          ConvertOptions,
                                          ConvertResult,
                                          convert_checkpoint,
                                          plan_conversion,
)
from pixtral_cpp.convert.progress import NullProgress, Progress
from pixtral_cpp.convert.quant_types import MMPROJ_TYPES, TEXT_TYPES

__all__ = [
    "ConversionPlan", "ConvertOptions", "ConvertResult", "MMPROJ_TYPES", "NullProgress", "Progress",
    "TEXT_TYPES", "convert_checkpoint", "plan_conversion",
]
