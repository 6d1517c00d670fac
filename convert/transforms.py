"""Small named transforms that the tensor table points to.

Each takes the source tensor in its storage dtype (bf16 as uint16 bits) and the config, and returns
the tensor in GGUF row order. Row shuffles are exact for any dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pixtral_cpp.convert.config import PixtralConfig

Transform = Callable[[np.ndarray, PixtralConfig], np.ndarray]


def identity(tensor: np.ndarray, config: PixtralConfig) -> np.ndarray:
    return tensor


def unpermute_rope_rows(tensor: np.ndarray, heads: int) -> np.ndarray:
    """transformers' half-split RoPE rows -> the interleaved pairs llama.cpp rotates.

    (h*d, C) viewed as (h, 2, d/2, C), middle axes swapped: inside each head, output row 2i+j is
    input row j*d/2+i. The exact inverse of transformers' convert_pixtral_weights_to_hf permute.
    """
    rows, cols = tensor.shape
    half = rows // heads // 2
    return tensor.reshape(heads, 2, half, cols).swapaxes(1, 2).reshape(rows, cols)


def unpermute_text_q(tensor: np.ndarray, config: PixtralConfig) -> np.ndarray:
    return unpermute_rope_rows(tensor, config.text.num_heads)


def unpermute_text_k(tensor: np.ndarray, config: PixtralConfig) -> np.ndarray:
    return unpermute_rope_rows(tensor, config.text.num_kv_heads)


def unpermute_vision_qk(tensor: np.ndarray, config: PixtralConfig) -> np.ndarray:
    return unpermute_rope_rows(tensor, config.vision.num_heads)
