"""GGUF pairs with exactly the quirks of files that llama.cpp's own converter wrote (docs/others-ggufs.md),
made from a tiny pair that pixtral-cpp converted: metadata rewritten and tensors copied with gguf-py's
writer, independently of pixtral_cpp/fix_pair.py, so the fix is tested against files it did not make.

    text, mmproj = write_quirky_pair(text, mmproj, tmp_path, Quirks(img_break=False, std_is_mean=True))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGUFValueType, Keys

from pixtral_cpp.gguf_file import GGUFHeader, read_gguf_header
from pixtral_cpp.gguf_keys import IMG_BREAK_TENSOR, TextKeys

KEEP = object()  # leave the value as pixtral-cpp wrote it


@dataclass(frozen=True)
class Quirks:
    """What differs from pixtral-cpp's files. The defaults are today's llama.cpp converter from the
    transformers layout (mistral-community/pixtral-12b), as published by ggml-org and bartowski."""

    img_break: bool = False  # today's converter drops v.token_embd.img_break from the transformers layout
    std_is_mean: bool = False  # before April 2025 (ggml-org/llama.cpp#13208): image_std written as image_mean
    mean_std_swapped: bool = False
    context_length: bool = True  # False: converted from Mistral's params.json, which has none
    chat_template: Any = None  # None: none written; a string: that one; KEEP: pixtral-cpp's
    pre_tokenizer: Any = "pixtral"  # what llama.cpp's converter picks for the real tokenizer.json
    size_label: str | None = "12B"  # llama.cpp's gguf.Metadata always writes general.size_label
    int32_scores: bool = False  # from params.json: tokenizer.ggml.scores as INT32 zeros


LLAMA_CPP_HF = Quirks()
LLAMA_CPP_NATIVE = Quirks(img_break=True, context_length=False, chat_template="mistral-v3-tekken",
                          pre_tokenizer="tekken", int32_scores=True)
OLD_LLAMA_CPP = Quirks(img_break=True, std_is_mean=True)  # mmproj files published before the April 2025 fix


def write_quirky_pair(text: Path, mmproj: Path, out_dir: Path, quirks: Quirks = LLAMA_CPP_HF,
                      names: tuple[str, str] = ("Pixtral-tiny-F32.gguf", "mmproj-Pixtral-tiny-f32.gguf")
                      ) -> tuple[Path, Path]:
    """The pair rewritten with `quirks` into `out_dir` under llama.cpp-style names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text_out, mmproj_out = out_dir / names[0], out_dir / names[1]
    _rewrite(read_gguf_header(text), text_out, _text_keys(quirks), drop_tensors=())
    _rewrite(read_gguf_header(mmproj), mmproj_out, _mmproj_keys(quirks),
             drop_tensors=() if quirks.img_break else (IMG_BREAK_TENSOR,))
    return text_out, mmproj_out


def _general(quirks: Quirks) -> dict[str, Any]:
    return {Keys.General.SIZE_LABEL: (quirks.size_label, GGUFValueType.STRING)} if quirks.size_label else {}


def _text_keys(quirks: Quirks) -> dict[str, Any]:
    keys: dict[str, Any] = _general(quirks)
    if not quirks.context_length:
        keys[TextKeys.CONTEXT_LENGTH] = None
    if quirks.chat_template is not KEEP:
        keys[Keys.Tokenizer.CHAT_TEMPLATE] = (None if quirks.chat_template is None
                                              else (quirks.chat_template, GGUFValueType.STRING))
    if quirks.pre_tokenizer is not KEEP:
        keys[Keys.Tokenizer.PRE] = (quirks.pre_tokenizer, GGUFValueType.STRING)
    if quirks.int32_scores:
        keys[Keys.Tokenizer.SCORES] = "int32 zeros"
    return keys


def _mmproj_keys(quirks: Quirks) -> dict[str, Any]:
    keys: dict[str, Any] = _general(quirks)
    if quirks.std_is_mean:
        keys[Keys.ClipVision.IMAGE_STD] = "the mean"
    if quirks.mean_std_swapped:
        keys[Keys.ClipVision.IMAGE_STD] = "the mean"
        keys[Keys.ClipVision.IMAGE_MEAN] = "the std"
    return keys


def _value(header: GGUFHeader, key: str, spec: Any) -> tuple[Any, GGUFValueType, GGUFValueType | None] | None:
    """(value, type, item type) to write for `key`, or None to leave it out."""
    if spec is None:
        return None
    if spec == "int32 zeros":
        return [0] * len(header.metadata[Keys.Tokenizer.LIST]), GGUFValueType.ARRAY, GGUFValueType.INT32
    if spec in ("the mean", "the std"):
        source = Keys.ClipVision.IMAGE_MEAN if spec == "the mean" else Keys.ClipVision.IMAGE_STD
        return list(header.metadata[source]), GGUFValueType.ARRAY, GGUFValueType.FLOAT32
    value, vtype = spec
    if vtype is None:  # the type the file has
        return value, header.value_types[key], header.array_types.get(key)
    return value, vtype, None


def rewrite_with_keys(source: Path, out: Path, keys: dict[str, tuple[Any, GGUFValueType | None] | None],
                      drop_tensors: tuple[str, ...] = ()) -> Path:
    """A copy of `source` with keys set ((value, type), type None: the file's) or removed (None)."""
    _rewrite(read_gguf_header(source), out, keys, drop_tensors)
    return out


def _rewrite(header: GGUFHeader, out: Path, keys: dict[str, Any], drop_tensors: tuple[str, ...]) -> None:
    writer = gguf.GGUFWriter(str(out), header.architecture)
    original = dict(header.metadata)
    pending = dict(keys)
    for key, value in original.items():
        if key == Keys.General.ARCHITECTURE:
            continue
        if key in pending:
            new = _value(header, key, pending.pop(key))
            if new is not None:
                writer.add_key_value(key, *new)
            continue
        writer.add_key_value(key, value, header.value_types[key], header.array_types.get(key))
    for key, spec in pending.items():
        new = _value(header, key, spec)
        if new is not None:
            writer.add_key_value(key, *new)
    for tensor in header.tensors.values():
        if tensor.name in drop_tensors:
            continue
        raw = np.asarray(header.tensor_data(tensor.name)).view(np.uint8).reshape(-1)
        shape = tuple(reversed(tensor.ne))
        writer.add_tensor(tensor.name, raw, raw_shape=_byte_shape(shape, tensor.type), raw_dtype=tensor.type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[int, ...]:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return (*shape[:-1], shape[-1] // block * size)
