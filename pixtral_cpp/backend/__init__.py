"""The llama.cpp backend: the only part of pixtral-cpp that talks to llama-cpp-python.

Everything here speaks numpy and pixtral-cpp's own types; C resources are owned by classes with
``close()`` and context managers. ``_native`` alone imports ``llama_cpp``; no module outside this
package imports either of them (tests/test_import_boundary.py checks it), so what the rest of the
project needs from llama.cpp is named here:

- models: :class:`TextModel` (text GGUF and its context), :class:`VisionContext` (mmproj, images),
  :class:`Sampler` and grammars, :class:`IncrementalDecoder`; several sequences of one context
  decoded together: :func:`decode_step` over :class:`Piece` objects (sequences.py, docs/parallel.md);
- the installed build (build_info): :func:`installed_backend`, :func:`cpu_features`,
  :func:`repacking_is_safe`, :func:`llama_supports_gpu_offload`;
- logging: :func:`set_verbose`, :func:`log_listener`, :func:`last_native_error`;
- the raw ctypes bindings, :func:`bindings`, and llama-cpp-python's own package,
  :func:`llama_cpp_python`, for code that holds llama.cpp's own routes up as a reference (tests,
  benchmarks); :func:`is_gguf`, checked before llama.cpp could abort on a file that is not one.

Importing this package loads no shared library: that happens on first use.
"""

from __future__ import annotations

from pixtral_cpp.backend._native import (
    bindings,
    is_gguf,
    last_native_error,
    llama_cpp_python,
    log_listener,
    set_verbose,
)
from pixtral_cpp.backend.build_info import (
    InstalledBackend,
    NativeDevice,
    cpu_features,
    installed_backend,
    llama_supports_gpu_offload,
    repacking_is_safe,
)
from pixtral_cpp.backend.detok import IncrementalDecoder
from pixtral_cpp.backend.sampling import (
    GrammarError,
    Sampler,
    SamplingError,
    SamplingOptions,
    json_schema_grammar,
)
from pixtral_cpp.backend.sequences import Piece, decode_step
from pixtral_cpp.backend.text import TextModel, TextModelOptions
from pixtral_cpp.backend.vision import ImageEmbedding, VisionContext

__all__ = [
    "GrammarError",
    "ImageEmbedding",
    "IncrementalDecoder",
    "InstalledBackend",
    "NativeDevice",
    "Piece",
    "Sampler",
    "SamplingError",
    "SamplingOptions",
    "TextModel",
    "TextModelOptions",
    "VisionContext",
    "bindings",
    "cpu_features",
    "decode_step",
    "installed_backend",
    "is_gguf",
    "json_schema_grammar",
    "last_native_error",
    "llama_cpp_python",
    "llama_supports_gpu_offload",
    "log_listener",
    "repacking_is_safe",
    "set_verbose",
]
