"""Sizes of synthetic Pixtral checkpoints: the real 12B model and smaller look-alikes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pixtral_cpp.errors import ConfigError

REAL_VOCAB = 131072  # tekken_240911.json default_vocab_size


@dataclass(frozen=True)
class TextShape:
    """Mistral decoder sizes (params.json `dim`, `n_layers`, ...)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int = REAL_VOCAB  # replaced by the tokenizer's vocabulary size when writing

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise ConfigError(f"text heads {self.heads} not divisible by kv_heads {self.kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"text head_dim {self.head_dim} must be even (RoPE rotates pairs)")


@dataclass(frozen=True)
class VisionShape:
    """Pixtral vision encoder sizes (params.json `vision_encoder.*`)."""

    hidden: int
    layers: int
    heads: int
    ffn: int
    patch: int = 16
    image_size: int = 1024
    channels: int = 3

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise ConfigError(f"vision hidden {self.hidden} not divisible by heads {self.heads}")
        if self.head_dim % 4:
            # The 2D RoPE splits each head into a row half and a column half of rotated pairs.
            raise ConfigError(f"vision head_dim {self.head_dim} must be divisible by 4")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class SyntheticShape:
    """A Pixtral-shaped model: decoder plus vision encoder (the adapter follows from both)."""

    text: TextShape
    vision: VisionShape

    def with_vocab(self, vocab: int) -> SyntheticShape:
        """The same shape with the vocabulary of a particular tokenizer."""
        return dataclasses.replace(self, text=dataclasses.replace(self.text, vocab=vocab))


SHAPES: dict[str, SyntheticShape] = {
    # Fast tests. head_dim 64 != 256 / 8 on purpose, like the real 128 != 5120 / 32; widths are multiples
    # of 256 so every llama.cpp quantization type applies without fallbacks.
    "tiny": SyntheticShape(
        TextShape(hidden=256, layers=2, heads=8, kv_heads=2, head_dim=64, ffn=512),
        VisionShape(hidden=256, layers=3, heads=4, ffn=512),
    ),
    # Real widths, reduced depth: per-layer timings and memory of the real model at a fraction of the size.
    "wide": SyntheticShape(
        TextShape(hidden=5120, layers=2, heads=32, kv_heads=8, head_dim=128, ffn=14336),
        VisionShape(hidden=1024, layers=2, heads=16, ffn=4096),
    ),
    # Pixtral-12B-2409 itself (docs/gguf-layout.md §1).
    "full": SyntheticShape(
        TextShape(hidden=5120, layers=40, heads=32, kv_heads=8, head_dim=128, ffn=14336),
        VisionShape(hidden=1024, layers=24, heads=16, ffn=4096),
    ),
}


def resolve_shape(shape: str | SyntheticShape) -> SyntheticShape:
    """A preset by name, or the given shape unchanged."""
    if isinstance(shape, SyntheticShape):
        return shape
    try:
        return SHAPES[shape]
    except KeyError:
        raise ConfigError(f"unknown synthetic shape {shape!r}; choose one of {sorted(SHAPES)}") from None
