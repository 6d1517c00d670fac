"""Which ggml type each text-model tensor gets in a llama.cpp quantization mix (Q4_K_M, ...).

The choices are llama.cpp's (src/llama-quant.cpp of the pinned version), written down for what a
Pixtral decoder contains: arch `llama`, one expert, an untied `output.weight`. A mix names the type of
most matrices and the exceptions: the output layer, and more bits for `attn_v` / `ffn_down` in some
layers. tests/test_quant_mix.py checks every mix byte for byte against llama.cpp's own quantizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
from gguf import GGMLQuantizationType as Q

# (layer, n_layers) -> the layer's type, or None for the mix's base type.
LayerRule = Callable[[int, int], Q | None]


def _keep(layer: int, n_layers: int) -> Q | None:
    return None


def _use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's spread of extra precision: the first and last eighth, and every third layer between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def more_bits(kind: Q) -> LayerRule:
    return lambda layer, n_layers: kind if _use_more_bits(layer, n_layers) else None


def first_layers(count: int, kind: Q, otherwise: Q | None = None) -> LayerRule:
    return lambda layer, n_layers: kind if layer < count else otherwise


def first_fraction(divisor: int, kind: Q, otherwise: Q | None = None) -> LayerRule:
    return lambda layer, n_layers: kind if layer < n_layers // divisor else otherwise


def every_layer(kind: Q) -> LayerRule:
    return lambda layer, n_layers: kind


@dataclass(frozen=True)
class Mix:
    """One llama_ftype's choice of types for the matrices of a `llama`-arch decoder."""

    ftype: gguf.LlamaFileType
    base: Q  # every quantizable matrix not named below
    attn_v: LayerRule = _keep
    ffn_down: LayerRule = _keep
    attn_output: Q | None = None
    # attn_v with fewer than 4 query heads per KV head (Pixtral has 4), where the mix says otherwise.
    attn_v_small_gqa: LayerRule | None = None

    @property
    def quantized(self) -> bool:
        return self.base not in (Q.F32, Q.F16, Q.BF16)

    def tensor_type(self, name: str, n_per_row: int, layer: int | None, n_layers: int, n_gqa: int) -> Q:
        """The type of the 2D tensor `name` whose rows hold `n_per_row` values."""
        if not self.quantized:
            return self.base
        return fit_row(self._preferred(name, n_per_row, layer, n_layers, n_gqa), n_per_row)

    def _preferred(self, name: str, n_per_row: int, layer: int | None, n_layers: int, n_gqa: int) -> Q:
        if name == "output.weight":
            # Q8_0 where the base's blocks do not fit the row, Q6_K otherwise (unless the base is Q8_0).
            if n_per_row % gguf.GGML_QUANT_SIZES[self.base][0]:
                return Q.Q8_0
            return self.base if self.base == Q.Q8_0 else Q.Q6_K
        if layer is None:  # token_embd
            return self.base
        rule = {"attn_v": self.attn_v if n_gqa >= 4 or self.attn_v_small_gqa is None else self.attn_v_small_gqa,
                "ffn_down": self.ffn_down}.get(_role(name))
        chosen = rule(layer, n_layers) if rule else None
        if _role(name) == "attn_output" and self.attn_output is not None:
            chosen = self.attn_output
        return chosen or self.base


def _role(name: str) -> str:
    """`blk.3.attn_v.weight` -> `attn_v`."""
    return name.split(".")[2] if name.startswith("blk.") else name


# Where a row is not a whole number of a type's blocks, llama.cpp falls back to a type with 32-value
# blocks, and to F16 where even that does not fit.
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.IQ4_XS: Q.IQ4_NL}


def fit_row(kind: Q, n_per_row: int) -> Q:
    if n_per_row % gguf.GGML_QUANT_SIZES[kind][0] == 0:
        return kind
    kind = _FALLBACK.get(kind, kind)
    return kind if n_per_row % gguf.GGML_QUANT_SIZES[kind][0] == 0 else Q.F16


F = gguf.LlamaFileType
MIXES: dict[str, Mix] = {
    "F32": Mix(F.ALL_F32, Q.F32),
    "F16": Mix(F.MOSTLY_F16, Q.F16),
    "BF16": Mix(F.MOSTLY_BF16, Q.BF16),
    "Q8_0": Mix(F.MOSTLY_Q8_0, Q.Q8_0),
    "Q6_K": Mix(F.MOSTLY_Q6_K, Q.Q6_K),
    "Q5_K_M": Mix(F.MOSTLY_Q5_K_M, Q.Q5_K, attn_v=more_bits(Q.Q6_K), ffn_down=more_bits(Q.Q6_K)),
    "Q5_K_S": Mix(F.MOSTLY_Q5_K_S, Q.Q5_K),
    "Q5_1": Mix(F.MOSTLY_Q5_1, Q.Q5_1),
    "Q5_0": Mix(F.MOSTLY_Q5_0, Q.Q5_0),
    "Q4_K_M": Mix(F.MOSTLY_Q4_K_M, Q.Q4_K, attn_v=more_bits(Q.Q6_K), ffn_down=more_bits(Q.Q6_K)),
    "Q4_K_S": Mix(F.MOSTLY_Q4_K_S, Q.Q4_K, attn_v=first_layers(4, Q.Q5_K), ffn_down=first_fraction(8, Q.Q5_K)),
    "Q4_1": Mix(F.MOSTLY_Q4_1, Q.Q4_1),
    "Q4_0": Mix(F.MOSTLY_Q4_0, Q.Q4_0),
    "IQ4_NL": Mix(F.MOSTLY_IQ4_NL, Q.IQ4_NL, attn_v=every_layer(Q.Q5_K), ffn_down=first_fraction(8, Q.Q5_K),
                  attn_v_small_gqa=_keep),
    "IQ4_XS": Mix(F.MOSTLY_IQ4_XS, Q.IQ4_XS, attn_v=every_layer(Q.Q5_K), ffn_down=first_fraction(8, Q.Q5_K),
                  attn_v_small_gqa=_keep),
    "Q3_K_L": Mix(F.MOSTLY_Q3_K_L, Q.Q3_K, attn_v=every_layer(Q.Q5_K), ffn_down=every_layer(Q.Q5_K),
                  attn_output=Q.Q5_K),
    "Q3_K_M": Mix(F.MOSTLY_Q3_K_M, Q.Q3_K, attn_v=first_layers(2, Q.Q5_K, Q.Q4_K),
                  ffn_down=first_fraction(16, Q.Q5_K, Q.Q4_K), attn_output=Q.Q4_K),
    "Q3_K_S": Mix(F.MOSTLY_Q3_K_S, Q.Q3_K),
    "Q2_K": Mix(F.MOSTLY_Q2_K, Q.Q2_K, attn_v=every_layer(Q.Q4_K), ffn_down=every_layer(Q.Q3_K),
                attn_output=Q.Q3_K, attn_v_small_gqa=every_layer(Q.Q3_K)),
}
