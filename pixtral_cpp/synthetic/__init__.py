"""Random Pixtral-shaped checkpoints for offline tests and benchmarks (no real weights needed)."""

from __future__ import annotations

from pixtral_cpp.synthetic.names import (
    HF_PREFIXES,
    TENSOR_TABLE,
    canonical_tensor_names,
    expected_tensor_count,
    hf_name,
)
from pixtral_cpp.synthetic.shapes import SHAPES, SyntheticShape, TextShape, VisionShape, resolve_shape
from pixtral_cpp.synthetic.weights import float32_to_bfloat16_bits, permute_for_hf, write_synthetic_checkpoint

__all__ = [
    "HF_PREFIXES",
    "SHAPES",
    "TENSOR_TABLE",
    "SyntheticShape",
    "TextShape",
    "VisionShape",
    "canonical_tensor_names",
    "expected_tensor_count",
    "float32_to_bfloat16_bits",
    "hf_name",
    "permute_for_hf",
    "resolve_shape",
    "write_synthetic_checkpoint",
]
