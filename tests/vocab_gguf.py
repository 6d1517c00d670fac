"""Vocabulary-only GGUF files, for tests that tokenize with llama.cpp without any weights."""

from __future__ import annotations

from pathlib import Path

import gguf

from pixtral_cpp.convert.tokenizer import Vocabulary, add_vocabulary_metadata


def write_vocab_gguf(vocab: Vocabulary, path: Path | str, chat_template: str | None = None) -> Path:
    """Write a tensor-less text GGUF that llama.cpp opens with `vocab_only=True`, for tokenizer tests.

    llama.cpp reads the llama hyper-parameters even for a vocabulary-only load, so the minimal set of facts
    §4.1 is written with tiny values.
    """
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_context_length(1024)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_key_length(32)
    writer.add_value_length(32)
    writer.add_rope_freq_base(1e9)
    add_vocabulary_metadata(writer, vocab)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
