"""The quantization types a user can ask for, and how each is produced.

Types that gguf-py quantizes exactly like ggml (F32/F16/BF16 casts and Q8_0) are written directly.
The K-quant and legacy mixes go through llama.cpp's own quantizer: a mix is more than one type
(Q4_K_M keeps `output.weight` and some attn_v/ffn_down in Q6_K), and reimplementing that policy
would drift from what llama.cpp users get.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q

from pixtral_cpp.errors import QuantizationError


@dataclass(frozen=True)
class QuantType:
    name: str
    direct: Q | None  # type written for every MATRIX tensor, when gguf-py can produce it
    bits_per_weight: float  # for size estimates (llama.cpp mixes measured on Mistral-NeMo shapes)

    @property
    def needs_llama_quantizer(self) -> bool:
        return self.direct is None


_DIRECT = (
    QuantType("F32", Q.F32, 32.0),
    QuantType("F16", Q.F16, 16.0),
    QuantType("BF16", Q.BF16, 16.0),
    QuantType("Q8_0", Q.Q8_0, 8.5),
)
# llama_ftype names (LLAMA_FTYPE_MOSTLY_<name>); bits per weight of the whole 12B file.
_MIXES = (
    QuantType("Q6_K", None, 6.56),
    QuantType("Q5_K_M", None, 5.69),
    QuantType("Q5_K_S", None, 5.54),
    QuantType("Q5_1", None, 6.0),
    QuantType("Q5_0", None, 5.5),
    QuantType("Q4_K_M", None, 4.89),
    QuantType("Q4_K_S", None, 4.58),
    QuantType("Q4_1", None, 5.0),
    QuantType("Q4_0", None, 4.5),
    QuantType("IQ4_NL", None, 4.5),
    QuantType("IQ4_XS", None, 4.25),
    QuantType("Q3_K_L", None, 4.27),
    QuantType("Q3_K_M", None, 3.91),
    QuantType("Q3_K_S", None, 3.5),
    QuantType("Q2_K", None, 3.0),
)
TEXT_TYPES: dict[str, QuantType] = {q.name: q for q in _DIRECT + _MIXES}
MMPROJ_TYPES: dict[str, QuantType] = {q.name: q for q in _DIRECT}

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
