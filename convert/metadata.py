"""GGUF metadata, derived from the parsed config and vocabulary only.

Key spellings and value types are gguf-py's (the add_* helpers write the exact types llama.cpp
checks); what llama.cpp requires is in docs/gguf-layout.md §4. Architecture names, the projector type and
the CLIP normalisation are pixtral_cpp.gguf_keys'.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from pixtral_cpp.convert.chat_template import PIXTRAL_CHAT_TEMPLATE
from pixtral_cpp.convert.config import PixtralConfig
from pixtral_cpp.convert.tokenizer import Vocabulary, add_vocabulary_metadata
from pixtral_cpp.gguf_keys import CLIP_IMAGE_MEAN, CLIP_IMAGE_STD
from pixtral_cpp.gguf_keys import PIXTRAL_PROJECTOR as PROJECTOR_TYPE  # a module global: tests write another


@dataclass(frozen=True)
class ModelInfo:
    """Descriptive metadata: what the model is called and where it came from."""

    name: str
    license: str | None = None
    source_url: str | None = None


def _add_general(writer: gguf.GGUFWriter, info: ModelInfo, file_type: int, kind: str) -> None:
    writer.add_type(kind)  # "model" / "mmproj", as llama.cpp's converter writes: Ollama files the mmproj by it
    writer.add_name(info.name)
    if info.license:
        writer.add_license(info.license)
    if info.source_url:
        writer.add_source_url(info.source_url)
    writer.add_file_type(file_type)  # llama_ftype
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_text_metadata(writer: gguf.GGUFWriter, config: PixtralConfig, vocab: Vocabulary, info: ModelInfo,
                      file_type: int) -> None:
    """Hyper-parameters, tokenizer and chat template of the text GGUF."""
    text = config.text
    _add_general(writer, info, file_type, gguf.GGUFType.MODEL)
    writer.add_context_length(text.context_length)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_layers)
    writer.add_feed_forward_length(text.ffn_size)
    writer.add_head_count(text.num_heads)
    writer.add_head_count_kv(text.num_kv_heads)
    writer.add_layer_norm_rms_eps(text.norm_eps)
    # head_dim (128) is not hidden/heads (160) in Pixtral: without these llama.cpp assumes 160.
    writer.add_key_length(text.head_dim)
    writer.add_value_length(text.head_dim)
    writer.add_rope_dimension_count(text.head_dim)
    writer.add_rope_freq_base(text.rope_theta)
    writer.add_vocab_size(len(vocab.tokens))
    add_vocabulary_metadata(writer, vocab)
    writer.add_chat_template(PIXTRAL_CHAT_TEMPLATE)


def add_mmproj_metadata(writer: gguf.GGUFWriter, config: PixtralConfig, info: ModelInfo,
                        file_type: int) -> None:
    """The clip keys mtmd reads for a Pixtral projector."""
    vision = config.vision
    _add_general(writer, info, file_type, gguf.GGUFType.MMPROJ)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(PROJECTOR_TYPE)
    writer.add_vision_projection_dim(config.text.hidden_size)
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.ffn_size)
    writer.add_vision_block_count(vision.num_layers)
    writer.add_vision_head_count(vision.num_heads)
    writer.add_vision_attention_layernorm_eps(vision.norm_eps)
    writer.add_vision_image_mean(list(CLIP_IMAGE_MEAN))
    writer.add_vision_image_std(list(CLIP_IMAGE_STD))
    # Without it mtmd runs a GELU-quick FFN: silently wrong (docs/gguf-layout.md §4.2).
    writer.add_vision_use_silu(True)
