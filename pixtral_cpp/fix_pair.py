"""Write a corrected copy of a GGUF pair that others converted, so that every tool runs it faithfully.

`pixtral-cpp fix` adds `v.token_embd.img_break` (the text model's [IMG_BREAK] row, dequantized to F32),
writes Pixtral's CLIP std where llama.cpp#13208 stored the mean, adds `llama.context_length` where
llama.cpp's converter left it out, and writes pixtral-cpp's chat template (docs/others-ggufs.md). Every
other key and tensor is copied byte for byte, streamed from the memory-mapped source; both files are
written under temporary names and renamed into place together, like `convert`.

The runtime uses the same writer for the one correction it makes itself (a missing [IMG_BREAK] vector,
which libmtmd requires): `runnable_mmproj` keeps a corrected mmproj in the user's cache.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
from gguf import GGUFValueType, Keys

from pixtral_cpp.convert.chat_template import PIXTRAL_CHAT_TEMPLATE
from pixtral_cpp.convert.config import DEFAULT_CONTEXT_LENGTH
from pixtral_cpp.convert.output import (
    METADATA_ALLOWANCE,
    check_free_space,
    partial_path,
    prepare_output_dir,
    publish_together,
    refuse_existing,
    temporary_files,
)
from pixtral_cpp.convert.progress import NullProgress, Progress
from pixtral_cpp.errors import ModelError, OutputError
from pixtral_cpp.gguf_file import GGUFHeader, read_gguf_header
from pixtral_cpp.gguf_keys import CLIP_IMAGE_STD, IMG_BREAK_TENSOR, TextKeys
from pixtral_cpp.model_files import ModelFiles, PairInfo, inspect_pair
from pixtral_cpp.pair_quirks import (
    FIXED_BY_KEY,
    IMG_BREAK_ID,
    TEKKEN_PRE,
    TOKEN_EMBD,
    img_break_source_problem,
    pair_quirks,
)
from pixtral_cpp.paths import CORRECTED_DIR_ENV, corrected_dir

CHUNK_BYTES = 64 * 1024 * 1024  # copied per write: memory stays flat whatever the tensor size
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyEdit:
    """A metadata key to set (added at the end if the source lacks it)."""

    key: str
    value: Any
    type: GGUFValueType
    item: GGUFValueType | None = None  # for ARRAY


@dataclass
class FileEdits:
    keys: list[KeyEdit] = field(default_factory=list)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # added F32 tensors, numpy order
    notes: list[str] = field(default_factory=list)  # what was corrected, for the user

    def stamp(self) -> None:
        """Record the corrections in the file, so `info` can say who wrote it and why."""
        if self.notes:
            self.keys.append(KeyEdit(FIXED_BY_KEY, "; ".join(self.notes), GGUFValueType.STRING))


@dataclass(frozen=True)
class FixResult:
    text_path: Path
    mmproj_path: Path
    corrections: tuple[str, ...]
    seconds: float


def fix_pair(files: ModelFiles, output_dir: Path, *, force: bool = False, keep_template: bool = False,
             progress: Progress | None = None) -> FixResult:
    """Write `files` corrected into `output_dir` under the same names; OutputError/ModelError on refusal."""
    started = time.monotonic()
    progress = progress or NullProgress()
    info = inspect_pair(files)
    _refuse_unfixable(info)
    text_header, mmproj_header = read_gguf_header(files.text), read_gguf_header(files.mmproj)
    text_edits = _text_edits(text_header, keep_template)
    mmproj_edits = _mmproj_edits(text_header, mmproj_header)
    text_out, mmproj_out = output_dir / files.text.name, output_dir / files.mmproj.name
    if {text_out.resolve(), mmproj_out.resolve()} & {files.text.resolve(), files.mmproj.resolve()}:
        raise OutputError(f"{output_dir} holds the source files; choose another output folder")
    prepare_output_dir(output_dir)
    refuse_existing([text_out, mmproj_out], force)
    needed = text_header.file_size + mmproj_header.file_size + 2 * METADATA_ALLOWANCE
    check_free_space(output_dir, needed)
    text_edits.stamp()
    mmproj_edits.stamp()
    text_partial, mmproj_partial = partial_path(text_out), partial_path(mmproj_out)
    with temporary_files(text_partial, mmproj_partial):
        rewrite_gguf(text_header, text_partial, text_edits, progress, f"text model {files.text.name}")
        rewrite_gguf(mmproj_header, mmproj_partial, mmproj_edits, progress, f"mmproj {files.mmproj.name}")
        publish_together((text_partial, text_out), (mmproj_partial, mmproj_out))
    return FixResult(text_out, mmproj_out, (*text_edits.notes, *mmproj_edits.notes), time.monotonic() - started)


def _refuse_unfixable(info: PairInfo) -> None:
    quirks = info.quirks
    assert quirks is not None
    fixable = {q.what for q in quirks.quirks if q.fixable}
    unfixable = [p for p in info.problems if not any(what in p for what in fixable)]
    if unfixable:
        raise ModelError("fix cannot correct this pair: " + "; ".join(unfixable))


def _text_edits(text: GGUFHeader, keep_template: bool) -> FileEdits:
    edits = FileEdits()
    if TextKeys.CONTEXT_LENGTH not in text.metadata:
        edits.keys.append(KeyEdit(TextKeys.CONTEXT_LENGTH, DEFAULT_CONTEXT_LENGTH, GGUFValueType.UINT32))
        edits.notes.append(f"added {TextKeys.CONTEXT_LENGTH} = {DEFAULT_CONTEXT_LENGTH} (Pixtral 12B's)")
    if text.get(Keys.Tokenizer.PRE) != TEKKEN_PRE:  # for llama.cpp's own tokenizer; pixtral-cpp's ignores it
        edits.keys.append(KeyEdit(Keys.Tokenizer.PRE, TEKKEN_PRE, GGUFValueType.STRING))
        edits.notes.append(f"wrote {Keys.Tokenizer.PRE} = {TEKKEN_PRE!r} (was {text.get(Keys.Tokenizer.PRE)!r})")
    if not keep_template and text.get(Keys.Tokenizer.CHAT_TEMPLATE) != PIXTRAL_CHAT_TEMPLATE:
        edits.keys.append(KeyEdit(Keys.Tokenizer.CHAT_TEMPLATE, PIXTRAL_CHAT_TEMPLATE, GGUFValueType.STRING))
        edits.notes.append("wrote pixtral-cpp's current chat template (mistral-common's prompts for other tools)")
    return edits


def _mmproj_edits(text: GGUFHeader, mmproj: GGUFHeader) -> FileEdits:
    edits = FileEdits()
    if IMG_BREAK_TENSOR not in mmproj.tensors:
        edits.tensors[IMG_BREAK_TENSOR] = img_break_vector(text)
        edits.notes.append(f"added {IMG_BREAK_TENSOR} from row {IMG_BREAK_ID} of {text.path.name}'s {TOKEN_EMBD}")
    quirks = pair_quirks(text, mmproj)  # the same judgement as `info`
    if quirks.named("std_is_mean") or quirks.named("mean_std_swapped"):
        mean_key, std_key = Keys.ClipVision.IMAGE_MEAN, Keys.ClipVision.IMAGE_STD
        edits.keys.append(KeyEdit(std_key, list(CLIP_IMAGE_STD), GGUFValueType.ARRAY, GGUFValueType.FLOAT32))
        if quirks.named("mean_std_swapped"):
            edits.keys.append(KeyEdit(mean_key, list(quirks.image_std), GGUFValueType.ARRAY, GGUFValueType.FLOAT32))
        edits.notes.append(f"wrote Pixtral's CLIP {std_key} ({quirks.normalization})")
    return edits


def img_break_vector(text: GGUFHeader) -> np.ndarray:
    """Row 12 of the text embedding, dequantized to float32: what Pixtral's [IMG_BREAK] rows hold."""
    problem = img_break_source_problem(text)
    if problem:
        raise ModelError(f"cannot supply {IMG_BREAK_TENSOR}: {problem}")
    embd = text.tensors[TOKEN_EMBD]
    row_bytes = embd.nbytes // embd.ne[1]
    with open(text.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        start = embd.offset + IMG_BREAK_ID * row_bytes
        raw = np.frombuffer(mapped[start:start + row_bytes], dtype=np.uint8)
    vector = gguf.quants.dequantize(raw, embd.type).astype(np.float32).reshape(-1)
    if vector.shape != (embd.ne[0],) or not np.isfinite(vector).all():
        raise ModelError(f"row {IMG_BREAK_ID} of {TOKEN_EMBD} in {text.path.name} is not {embd.ne[0]} finite values")
    return vector


def rewrite_gguf(source: GGUFHeader, out: Path, edits: FileEdits, progress: Progress, label: str) -> None:
    """Copy `source` to `out` with the key edits applied and the added tensors appended."""
    arch = source.architecture
    writer = gguf.GGUFWriter(None, arch)
    alignment = source.get(Keys.General.ALIGNMENT)
    if isinstance(alignment, int):
        writer.data_alignment = alignment
    changed = {e.key: e for e in edits.keys}
    for key, value in source.metadata.items():
        if key == Keys.General.ARCHITECTURE:
            continue  # the writer adds it first
        edit = changed.pop(key, None)
        if edit is not None:
            writer.add_key_value(key, edit.value, edit.type, edit.item)
        else:
            writer.add_key_value(key, value, source.value_types[key], source.array_types.get(key))
    for edit in changed.values():
        writer.add_key_value(edit.key, edit.value, edit.type, edit.item)
    tensors = sorted(source.tensors.values(), key=lambda t: t.offset)
    for tensor in tensors:
        writer.add_tensor_info(tensor.name, tuple(reversed(tensor.ne)), np.dtype(np.float32), tensor.nbytes,
                               raw_dtype=tensor.type)
    for name, array in edits.tensors.items():
        writer.add_tensor_info(name, array.shape, np.dtype(np.float32), array.nbytes)
    progress.begin(label, sum(t.nbytes for t in tensors) + sum(a.nbytes for a in edits.tensors.values()))
    writer.write_header_to_file(out)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    assert writer.fout is not None
    fout = writer.fout[0]
    try:
        with open(source.path, "rb") as f:
            for tensor in tensors:
                writer.write_padding(fout, fout.tell())
                _copy_bytes(f, fout, tensor.offset, tensor.nbytes, progress)
                writer.write_padding(fout, tensor.nbytes)
        for array in edits.tensors.values():
            writer.write_padding(fout, fout.tell())
            fout.write(np.ascontiguousarray(array, dtype=np.float32).tobytes())
            progress.advance(array.nbytes)
            writer.write_padding(fout, array.nbytes)
        fout.flush()
    finally:
        writer.close()
    progress.end()


def _copy_bytes(source: BinaryIO, out: BinaryIO, offset: int, nbytes: int, progress: Progress) -> None:
    source.seek(offset)
    left = nbytes
    while left:
        chunk = source.read(min(CHUNK_BYTES, left))
        if not chunk:
            raise ModelError(f"{getattr(source, 'name', 'the source')} ends inside a tensor")
        out.write(chunk)
        left -= len(chunk)
        progress.advance(len(chunk))


# -- the runtime's own correction ------------------------------------------------------------------------

def runnable_mmproj(files: ModelFiles, info: PairInfo, progress: Progress | None = None) -> Path:
    """The mmproj libmtmd can load for this pair: the file itself, or a copy with the [IMG_BREAK] vector
    taken from the text model, written once into the cache (libmtmd refuses a Pixtral mmproj without it)."""
    if info.quirks is None or not info.quirks.needs_img_break:
        return files.mmproj
    target = _cached_name(files)
    if target.is_file():
        return target
    text, mmproj = read_gguf_header(files.text), read_gguf_header(files.mmproj)
    edits = FileEdits(tensors={IMG_BREAK_TENSOR: img_break_vector(text)},
                      notes=[f"added {IMG_BREAK_TENSOR} from row {IMG_BREAK_ID} of {files.text.name}"])
    edits.stamp()
    prepare_output_dir(target.parent)
    try:
        check_free_space(target.parent, mmproj.file_size + METADATA_ALLOWANCE)
    except OutputError as exc:
        raise ModelError(f"{files.mmproj.name} lacks {IMG_BREAK_TENSOR} and pixtral-cpp cannot write its "
                         f"corrected copy: {exc}; set ${CORRECTED_DIR_ENV} to a folder with room or run "
                         f"`pixtral-cpp fix`") from None
    partial = partial_path(target, f".{os.getpid()}")  # two processes may correct the same file at once
    with temporary_files(partial):
        rewrite_gguf(mmproj, partial, edits, progress or NullProgress(), f"mmproj {files.mmproj.name} + [IMG_BREAK]")
        publish_together((partial, target))
    log.info("%s lacks %s: wrote a corrected copy with the text model's vector to %s (once; `pixtral-cpp fix` "
             "writes a pair for other tools)", files.mmproj.name, IMG_BREAK_TENSOR, target)
    return target


def _cached_name(files: ModelFiles) -> Path:
    """Keyed by both files' paths, sizes and modification times: a changed file gets a new copy."""
    identity = hashlib.sha256()
    for path in (files.text, files.mmproj):
        stat = path.stat()
        identity.update(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return corrected_dir() / identity.hexdigest()[:16] / files.mmproj.name
