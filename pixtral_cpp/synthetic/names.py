"""The Pixtral tensor table: one row per tensor kind, its native and HF names, shape and initialisation.

Independent of convert/tensor_map.py on purpose: the synthetic checkpoints are the oracle the converter is
tested against, so this table spells the source names again from the model's own layouts and imports
nothing from the converter (a name wrong in the converter's table then fails its tests instead of being
generated wrong here too).
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pixtral_cpp.errors import TensorError
from pixtral_cpp.synthetic.shapes import SyntheticShape

HfPrefixes = Literal["legacy", "current"]

# HF name prefixes. "legacy": the old Llava layout of mistral-community/pixtral-12b (transformers 4.45);
# "current": what transformers >= 4.52 saves for LlavaForConditionalGeneration.
HF_PREFIXES: dict[str, dict[str, str]] = {
    "legacy": {
        "text": "language_model.model.",
        "head": "language_model.lm_head.",
        "vision": "vision_tower.",
        "proj": "multi_modal_projector.",
    },
    "current": {
        "text": "model.language_model.",
        "head": "lm_head.",
        "vision": "model.vision_tower.",
        "proj": "model.multi_modal_projector.",
    },
}


class Init(enum.Enum):
    """How a tensor's values are drawn (see weights.py for the scales)."""

    MATRIX = "matrix"
    CONV = "conv"
    NORM = "norm"
    BIAS = "bias"
    EMBEDDING = "embedding"


class Rope(enum.Enum):
    """Which head count the native->HF RoPE row permutation of this tensor uses."""

    NONE = "none"
    TEXT_Q = "text_q"
    TEXT_KV = "text_kv"
    VISION = "vision"


class Repeat(enum.Enum):
    """Whether a row describes one tensor or one per text/vision layer."""

    ONCE = "once"
    TEXT_LAYERS = "text_layers"
    VISION_LAYERS = "vision_layers"


ShapeOf = Callable[[SyntheticShape], tuple[int, ...]]


@dataclass(frozen=True)
class TensorKind:
    """One row of the table; `{n}` in a name is the layer index, `{text}` etc. an HF prefix."""

    native: str
    hf: str
    shape: ShapeOf
    init: Init
    rope: Rope = Rope.NONE
    repeat: Repeat = Repeat.ONCE


def _q_rows(s: SyntheticShape) -> int:
    return s.text.heads * s.text.head_dim


def _kv_rows(s: SyntheticShape) -> int:
    return s.text.kv_heads * s.text.head_dim


_T, _V = Repeat.TEXT_LAYERS, Repeat.VISION_LAYERS
_VL_NATIVE, _VL_HF = "vision_encoder.transformer.layers.{n}.", "{vision}transformer.layers.{n}."

# Sources: docs/gguf-layout.md §2.1 (text) and §2.2 (vision, adapter); shapes are torch (out, in).
TENSOR_TABLE: tuple[TensorKind, ...] = (
    # Text decoder (Mistral-NeMo layout).
    TensorKind("tok_embeddings.weight", "{text}embed_tokens.weight",
               lambda s: (s.text.vocab, s.text.hidden), Init.EMBEDDING),
    TensorKind("norm.weight", "{text}norm.weight", lambda s: (s.text.hidden,), Init.NORM),
    TensorKind("output.weight", "{head}weight", lambda s: (s.text.vocab, s.text.hidden), Init.MATRIX),
    TensorKind("layers.{n}.attention_norm.weight", "{text}layers.{n}.input_layernorm.weight",
               lambda s: (s.text.hidden,), Init.NORM, repeat=_T),
    TensorKind("layers.{n}.attention.wq.weight", "{text}layers.{n}.self_attn.q_proj.weight",
               lambda s: (_q_rows(s), s.text.hidden), Init.MATRIX, Rope.TEXT_Q, _T),
    TensorKind("layers.{n}.attention.wk.weight", "{text}layers.{n}.self_attn.k_proj.weight",
               lambda s: (_kv_rows(s), s.text.hidden), Init.MATRIX, Rope.TEXT_KV, _T),
    TensorKind("layers.{n}.attention.wv.weight", "{text}layers.{n}.self_attn.v_proj.weight",
               lambda s: (_kv_rows(s), s.text.hidden), Init.MATRIX, repeat=_T),
    TensorKind("layers.{n}.attention.wo.weight", "{text}layers.{n}.self_attn.o_proj.weight",
               lambda s: (s.text.hidden, _q_rows(s)), Init.MATRIX, repeat=_T),
    TensorKind("layers.{n}.ffn_norm.weight", "{text}layers.{n}.post_attention_layernorm.weight",
               lambda s: (s.text.hidden,), Init.NORM, repeat=_T),
    TensorKind("layers.{n}.feed_forward.w1.weight", "{text}layers.{n}.mlp.gate_proj.weight",
               lambda s: (s.text.ffn, s.text.hidden), Init.MATRIX, repeat=_T),
    TensorKind("layers.{n}.feed_forward.w3.weight", "{text}layers.{n}.mlp.up_proj.weight",
               lambda s: (s.text.ffn, s.text.hidden), Init.MATRIX, repeat=_T),
    TensorKind("layers.{n}.feed_forward.w2.weight", "{text}layers.{n}.mlp.down_proj.weight",
               lambda s: (s.text.hidden, s.text.ffn), Init.MATRIX, repeat=_T),
    # Vision encoder (no biases, no position embedding, no post-norm).
    TensorKind("vision_encoder.patch_conv.weight", "{vision}patch_conv.weight",
               lambda s: (s.vision.hidden, s.vision.channels, s.vision.patch, s.vision.patch), Init.CONV),
    TensorKind("vision_encoder.ln_pre.weight", "{vision}ln_pre.weight",
               lambda s: (s.vision.hidden,), Init.NORM),
    TensorKind(_VL_NATIVE + "attention_norm.weight", _VL_HF + "attention_norm.weight",
               lambda s: (s.vision.hidden,), Init.NORM, repeat=_V),
    TensorKind(_VL_NATIVE + "attention.wq.weight", _VL_HF + "attention.q_proj.weight",
               lambda s: (s.vision.hidden, s.vision.hidden), Init.MATRIX, Rope.VISION, _V),
    TensorKind(_VL_NATIVE + "attention.wk.weight", _VL_HF + "attention.k_proj.weight",
               lambda s: (s.vision.hidden, s.vision.hidden), Init.MATRIX, Rope.VISION, _V),
    TensorKind(_VL_NATIVE + "attention.wv.weight", _VL_HF + "attention.v_proj.weight",
               lambda s: (s.vision.hidden, s.vision.hidden), Init.MATRIX, repeat=_V),
    TensorKind(_VL_NATIVE + "attention.wo.weight", _VL_HF + "attention.o_proj.weight",
               lambda s: (s.vision.hidden, s.vision.hidden), Init.MATRIX, repeat=_V),
    TensorKind(_VL_NATIVE + "ffn_norm.weight", _VL_HF + "ffn_norm.weight",
               lambda s: (s.vision.hidden,), Init.NORM, repeat=_V),
    TensorKind(_VL_NATIVE + "feed_forward.w1.weight", _VL_HF + "feed_forward.gate_proj.weight",
               lambda s: (s.vision.ffn, s.vision.hidden), Init.MATRIX, repeat=_V),
    TensorKind(_VL_NATIVE + "feed_forward.w3.weight", _VL_HF + "feed_forward.up_proj.weight",
               lambda s: (s.vision.ffn, s.vision.hidden), Init.MATRIX, repeat=_V),
    TensorKind(_VL_NATIVE + "feed_forward.w2.weight", _VL_HF + "feed_forward.down_proj.weight",
               lambda s: (s.vision.hidden, s.vision.ffn), Init.MATRIX, repeat=_V),
    # Vision-language adapter: Linear(vision -> text, bias), GELU, Linear(text -> text, bias).
    TensorKind("vision_language_adapter.w_in.weight", "{proj}linear_1.weight",
               lambda s: (s.text.hidden, s.vision.hidden), Init.MATRIX),
    TensorKind("vision_language_adapter.w_in.bias", "{proj}linear_1.bias",
               lambda s: (s.text.hidden,), Init.BIAS),
    TensorKind("vision_language_adapter.w_out.weight", "{proj}linear_2.weight",
               lambda s: (s.text.hidden, s.text.hidden), Init.MATRIX),
    TensorKind("vision_language_adapter.w_out.bias", "{proj}linear_2.bias",
               lambda s: (s.text.hidden,), Init.BIAS),
)


@dataclass(frozen=True)
class CheckpointTensor:
    """One concrete tensor of a synthetic checkpoint (the converter's GGUF-side record is plan.PlannedTensor)."""

    native: str
    kind: TensorKind
    layer: int | None
    shape: tuple[int, ...]

    def hf_name(self, prefixes: HfPrefixes) -> str:
        return self.kind.hf.format(n=self.layer, **HF_PREFIXES[prefixes])


def _layer_count(repeat: Repeat, shape: SyntheticShape) -> int | None:
    if repeat is Repeat.TEXT_LAYERS:
        return shape.text.layers
    if repeat is Repeat.VISION_LAYERS:
        return shape.vision.layers
    return None


def _repeat_count(repeat: Repeat, shape: SyntheticShape) -> int:
    count = _layer_count(repeat, shape)
    return 1 if count is None else count


def plan_tensors(shape: SyntheticShape) -> list[CheckpointTensor]:
    """Every tensor of the checkpoint in writing order: table order, repeated blocks layer by layer."""
    planned = []
    for repeat, group in itertools.groupby(TENSOR_TABLE, key=lambda kind: kind.repeat):
        kinds = list(group)
        count = _layer_count(repeat, shape)
        layers: list[int | None] = list(range(count)) if count is not None else [None]
        for layer in layers:
            planned.extend(CheckpointTensor(kind.native.format(n=layer), kind, layer, kind.shape(shape))
                           for kind in kinds)
    return planned


def canonical_tensor_names(shape: SyntheticShape) -> list[str]:
    """The native (consolidated.safetensors) names of every tensor, in writing order."""
    return [tensor.native for tensor in plan_tensors(shape)]


def expected_tensor_count(shape: SyntheticShape) -> int:
    """Number of tensors in a checkpoint of this shape (the same in both layouts), counted from the table."""
    return sum(_repeat_count(kind.repeat, shape) for kind in TENSOR_TABLE)


def _native_pattern(kind: TensorKind) -> re.Pattern[str]:
    return re.compile(re.escape(kind.native).replace(re.escape("{n}"), r"(\d+)") + "$")


_NATIVE_PATTERNS = [(_native_pattern(kind), kind) for kind in TENSOR_TABLE]


def hf_name(native_name: str, prefixes: HfPrefixes = "legacy") -> str:
    """The HF-layout name of a native tensor name."""
    for pattern, kind in _NATIVE_PATTERNS:
        match = pattern.match(native_name)
        if match:
            layer = int(match.group(1)) if match.groups() else None
            return kind.hf.format(n=layer, **HF_PREFIXES[prefixes])
    raise TensorError(f"{native_name!r} is not a Pixtral tensor name")
