"""The declarative name table: one row per GGUF tensor, with its source names in both layouts.

Names come from docs/gguf-layout.md §2 (native: mistral-inference / vLLM; HF: transformers'
convert_pixtral_weights_to_hf, legacy Llava prefixes). GGUF names are spelled through gguf-py's
MODEL_TENSOR table. `{bid}` is the block index.

This table is the converter's own. pixtral_cpp/synthetic/names.py spells the source names a second time on
purpose and imports nothing from here: the synthetic checkpoints are the oracle the converter is tested
against, so a wrong name here cannot also be wrong there.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import gguf

from pixtral_cpp.convert import transforms as T
from pixtral_cpp.convert.config import PixtralConfig
from pixtral_cpp.gguf_keys import IMG_BREAK_TENSOR

MT = gguf.MODEL_TENSOR


class Storage(enum.Enum):
    """How a tensor's output type is chosen (docs/gguf-layout.md §3.2)."""

    MATRIX = "matrix"  # the requested type
    F32 = "f32"  # norms, biases, img_break: llama.cpp expects F32
    PATCH = "patch"  # v.patch_embd: F16 when the mmproj is F16, else F32; never quantized


class Target(enum.Enum):
    TEXT = "text"
    MMPROJ = "mmproj"


Shape = Callable[[PixtralConfig], tuple[int, ...]]


@dataclass(frozen=True)
class TensorRow:
    gguf: str  # GGUF name, `{bid}` for blocks
    native: str  # params.json / consolidated.safetensors name
    hf: str  # config.json / model-*.safetensors name (legacy prefixes)
    shape: Shape  # expected torch shape (out, in)
    storage: Storage = Storage.MATRIX
    hf_transform: T.Transform = T.identity  # applied to HF-layout sources only
    take_row_of: str | None = None  # the GGUF tensor is one row of the source, at this token


def _gguf(tensor: MT, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[tensor] + suffix


_LM = "language_model.model."
_VT = "vision_tower.transformer.layers.{bid}."
_NV = "vision_encoder.transformer.layers.{bid}."

TEXT_GLOBAL_ROWS: tuple[TensorRow, ...] = (
    TensorRow(_gguf(MT.TOKEN_EMBD), "tok_embeddings.weight", _LM + "embed_tokens.weight",
              lambda c: (c.text.vocab_size, c.text.hidden_size)),
    TensorRow(_gguf(MT.OUTPUT_NORM), "norm.weight", _LM + "norm.weight",
              lambda c: (c.text.hidden_size,), Storage.F32),
    TensorRow(_gguf(MT.OUTPUT), "output.weight", "language_model.lm_head.weight",
              lambda c: (c.text.vocab_size, c.text.hidden_size)),
)

TEXT_BLOCK_ROWS: tuple[TensorRow, ...] = (
    TensorRow(_gguf(MT.ATTN_NORM), "layers.{bid}.attention_norm.weight",
              _LM + "layers.{bid}.input_layernorm.weight", lambda c: (c.text.hidden_size,), Storage.F32),
    TensorRow(_gguf(MT.ATTN_Q), "layers.{bid}.attention.wq.weight", _LM + "layers.{bid}.self_attn.q_proj.weight",
              lambda c: (c.text.q_width, c.text.hidden_size), hf_transform=T.unpermute_text_q),
    TensorRow(_gguf(MT.ATTN_K), "layers.{bid}.attention.wk.weight", _LM + "layers.{bid}.self_attn.k_proj.weight",
              lambda c: (c.text.kv_width, c.text.hidden_size), hf_transform=T.unpermute_text_k),
    TensorRow(_gguf(MT.ATTN_V), "layers.{bid}.attention.wv.weight", _LM + "layers.{bid}.self_attn.v_proj.weight",
              lambda c: (c.text.kv_width, c.text.hidden_size)),
    TensorRow(_gguf(MT.ATTN_OUT), "layers.{bid}.attention.wo.weight", _LM + "layers.{bid}.self_attn.o_proj.weight",
              lambda c: (c.text.hidden_size, c.text.q_width)),
    TensorRow(_gguf(MT.FFN_NORM), "layers.{bid}.ffn_norm.weight",
              _LM + "layers.{bid}.post_attention_layernorm.weight", lambda c: (c.text.hidden_size,), Storage.F32),
    TensorRow(_gguf(MT.FFN_GATE), "layers.{bid}.feed_forward.w1.weight", _LM + "layers.{bid}.mlp.gate_proj.weight",
              lambda c: (c.text.ffn_size, c.text.hidden_size)),
    TensorRow(_gguf(MT.FFN_UP), "layers.{bid}.feed_forward.w3.weight", _LM + "layers.{bid}.mlp.up_proj.weight",
              lambda c: (c.text.ffn_size, c.text.hidden_size)),
    TensorRow(_gguf(MT.FFN_DOWN), "layers.{bid}.feed_forward.w2.weight", _LM + "layers.{bid}.mlp.down_proj.weight",
              lambda c: (c.text.hidden_size, c.text.ffn_size)),
)

MMPROJ_GLOBAL_ROWS: tuple[TensorRow, ...] = (
    TensorRow(_gguf(MT.V_ENC_EMBD_PATCH), "vision_encoder.patch_conv.weight", "vision_tower.patch_conv.weight",
              lambda c: (c.vision.hidden_size, c.vision.num_channels, c.vision.patch_size, c.vision.patch_size),
              Storage.PATCH),
    TensorRow(_gguf(MT.V_PRE_NORM), "vision_encoder.ln_pre.weight", "vision_tower.ln_pre.weight",
              lambda c: (c.vision.hidden_size,), Storage.F32),
    # The adapter: Linear(vision -> text) + GELU + Linear(text -> text); mtmd calls them mm.1 / mm.2.
    TensorRow("mm.1.weight", "vision_language_adapter.w_in.weight", "multi_modal_projector.linear_1.weight",
              lambda c: (c.text.hidden_size, c.vision.hidden_size)),
    TensorRow("mm.2.weight", "vision_language_adapter.w_out.weight", "multi_modal_projector.linear_2.weight",
              lambda c: (c.text.hidden_size, c.text.hidden_size)),
    # [IMG_BREAK]'s embedding, which mtmd inserts after each row of patches.
    TensorRow(IMG_BREAK_TENSOR, "tok_embeddings.weight", _LM + "embed_tokens.weight",
              lambda c: (c.text.hidden_size,), Storage.F32, take_row_of="[IMG_BREAK]"),
)

ADAPTER_BIAS_ROWS: tuple[TensorRow, ...] = (
    TensorRow("mm.1.bias", "vision_language_adapter.w_in.bias", "multi_modal_projector.linear_1.bias",
              lambda c: (c.text.hidden_size,), Storage.F32),
    TensorRow("mm.2.bias", "vision_language_adapter.w_out.bias", "multi_modal_projector.linear_2.bias",
              lambda c: (c.text.hidden_size,), Storage.F32),
)

MMPROJ_BLOCK_ROWS: tuple[TensorRow, ...] = (
    TensorRow(_gguf(MT.V_ENC_INPUT_NORM), _NV + "attention_norm.weight", _VT + "attention_norm.weight",
              lambda c: (c.vision.hidden_size,), Storage.F32),
    TensorRow(_gguf(MT.V_ENC_ATTN_Q), _NV + "attention.wq.weight", _VT + "attention.q_proj.weight",
              lambda c: (c.vision.hidden_size, c.vision.hidden_size), hf_transform=T.unpermute_vision_qk),
    TensorRow(_gguf(MT.V_ENC_ATTN_K), _NV + "attention.wk.weight", _VT + "attention.k_proj.weight",
              lambda c: (c.vision.hidden_size, c.vision.hidden_size), hf_transform=T.unpermute_vision_qk),
    TensorRow(_gguf(MT.V_ENC_ATTN_V), _NV + "attention.wv.weight", _VT + "attention.v_proj.weight",
              lambda c: (c.vision.hidden_size, c.vision.hidden_size)),
    TensorRow(_gguf(MT.V_ENC_ATTN_O), _NV + "attention.wo.weight", _VT + "attention.o_proj.weight",
              lambda c: (c.vision.hidden_size, c.vision.hidden_size)),
    TensorRow(_gguf(MT.V_ENC_POST_ATTN_NORM), _NV + "ffn_norm.weight", _VT + "ffn_norm.weight",
              lambda c: (c.vision.hidden_size,), Storage.F32),
    TensorRow(_gguf(MT.V_ENC_FFN_GATE), _NV + "feed_forward.w1.weight", _VT + "feed_forward.gate_proj.weight",
              lambda c: (c.vision.ffn_size, c.vision.hidden_size)),
    TensorRow(_gguf(MT.V_ENC_FFN_UP), _NV + "feed_forward.w3.weight", _VT + "feed_forward.up_proj.weight",
              lambda c: (c.vision.ffn_size, c.vision.hidden_size)),
    TensorRow(_gguf(MT.V_ENC_FFN_DOWN), _NV + "feed_forward.w2.weight", _VT + "feed_forward.down_proj.weight",
              lambda c: (c.vision.hidden_size, c.vision.ffn_size)),
)

# transformers >= 4.52 saves Llava checkpoints under new prefixes; both spell the same tensors.
HF_PREFIX_ALIASES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)

# Source tensors that are deliberately not converted (buffers some exporters save).
SKIPPED_SUFFIXES: tuple[str, ...] = (".rotary_emb.inv_freq",)


def canonical_hf_name(name: str) -> str:
    """Rewrite a current-prefix HF name to the legacy spelling used in the table."""
    for current, legacy in HF_PREFIX_ALIASES:
        if name.startswith(current):
            return legacy + name[len(current):]
    return name


def rows_for(target: Target, config: PixtralConfig) -> Iterator[tuple[TensorRow, int | None]]:
    """All (row, block index) pairs that make up one output file, in file order.

    A generator: a corrupt layer count (billions) then fails at the first missing tensor instead of
    first building billions of rows.
    """
    if target is Target.TEXT:
        globals_, blocks, layers = TEXT_GLOBAL_ROWS, TEXT_BLOCK_ROWS, config.text.num_layers
    else:
        globals_ = MMPROJ_GLOBAL_ROWS + (ADAPTER_BIAS_ROWS if config.vision.adapter_bias else ())
        blocks, layers = MMPROJ_BLOCK_ROWS, config.vision.num_layers
    yield from ((row, None) for row in globals_)
    yield from ((row, bid) for bid in range(layers) for row in blocks)
