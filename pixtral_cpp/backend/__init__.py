"""The llama.cpp backend: the only part of pixtral-cpp that talks to llama-cpp-python's bindings.

Everything here speaks numpy and pixtral-cpp's own types; C resources are owned by classes with
``close()`` and context managers.
"""

from __future__ import annotations

from pixtral_cpp.backend._native import llama_supports_gpu_offload, set_verbose
from pixtral_cpp.backend.detok import IncrementalDecoder
from pixtral_cpp.backend.quantize import LLAMA_FTYPES, quantize_gguf
from pixtral_cpp.backend.sampling import (
    GrammarError,
    Sampler,
    SamplingError,
    SamplingOptions,
    json_schema_grammar,
)
from pixtral_cpp.backend.text import TextModel, TextModelOptions
from pixtral_cpp.backend.vision import ImageEmbedding, VisionContext, prompt_logits

__all__ = [
    "LLAMA_FTYPES",
    "GrammarError",
    "ImageEmbedding",
    "IncrementalDecoder",
    "Sampler",
    "SamplingError",
    "SamplingOptions",
    "TextModel",
    "TextModelOptions",
    "VisionContext",
    "json_schema_grammar",
    "llama_supports_gpu_offload",
    "prompt_logits",
    "quantize_gguf",
    "set_verbose",
]
