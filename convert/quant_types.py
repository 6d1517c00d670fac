"""The quantization types a user can ask for.

Each is a llama.cpp file type: one type for every matrix (F16, Q8_0, ...) or a mix (Q4_K_M keeps
`output.weight` and some attn_v/ffn_down layers in Q6_K), chosen per tensor by `quant_mix.MIXES` and
quantized row by row with ggml's own quantizers, so the files equal what llama-quantize writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from pixtral_cpp.convert.quant_mix import MIXES, Mix
from pixtral_cpp.errors import QuantizationError


@dataclass(frozen=True)
class QuantType:
    name: str
    mix: Mix

    @property
    def ftype(self) -> int:
        """general.file_type (llama_ftype)."""
        return int(self.mix.ftype)


_MMPROJ_NAMES = ("F32", "F16", "BF16", "Q8_0")
TEXT_TYPES: dict[str, QuantType] = {name: QuantType(name, mix) for name, mix in MIXES.items()}
MMPROJ_TYPES: dict[str, QuantType] = {name: TEXT_TYPES[name] for name in _MMPROJ_NAMES}

# llama.cpp refuses these (or produces garbage) without an importance matrix (llama-quant.cpp).
NEEDS_IMATRIX = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S")


def text_quant(name: str) -> QuantType:
    """Look up a text-model type by name (case-insensitive), with an actionable error."""
    return _lookup(name, TEXT_TYPES, "text model")


def mmproj_quant(name: str) -> QuantType:
    """Look up an mmproj type by name (case-insensitive), with an actionable error."""
    return _lookup(name, MMPROJ_TYPES, "mmproj")


def _lookup(name: str, table: dict[str, QuantType], what: str) -> QuantType:
    key = name.strip().upper()
    if key in table:
        return table[key]
    if key in NEEDS_IMATRIX:
        raise QuantizationError(
            f"{key} needs an importance matrix (imatrix), which pixtral-cpp does not compute; "
            f"choose Q3_K_M or larger, e.g. Q4_K_M")
    raise QuantizationError(f"unknown {what} quantization {name!r}; choose one of {', '.join(table)}")
