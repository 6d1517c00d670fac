"""A fast, validating GGUF reader: metadata and tensor directory, tensor data as mapped views.

Used to check files before llama.cpp sees them (llama.cpp aborts the process on some bad files)
and by `info`. gguf-py's GGUFReader builds a numpy view per array element and needs ~12 s for
Pixtral's 400k-entry vocabulary; this reads the same header in well under a second.

The file is untrusted: every count is checked against the bytes left before anything is read or
allocated for it (a corrupt array count must not make us walk gigabytes), fixed-size arrays are read
with numpy in one go, and arrays of arrays are refused (llama.cpp's reader refuses them too).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType, Keys

from pixtral_cpp.errors import ModelError

GGUF_MAGIC = b"GGUF"
GGML_MAX_DIMS = 4  # ggml.h
GGML_MAX_NAME = 64  # ggml.h: tensor names are stored in a 64-byte field, NUL included
_INT64_MAX = 2**63 - 1  # ggml's dimensions and element counts are int64_t
_SCALARS = {  # struct formats; numpy reads the same codes for arrays
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_DTYPES = {vtype: np.dtype(fmt) for vtype, fmt in _SCALARS.items()}
# Far beyond what any GGUF llama.cpp reads holds (Pixtral: 131k tokens, 269k merges, a 10 kB chat template),
# and small enough that a corrupt count inside the file size cannot make us build a list of a billion
# empty strings from a file's zero-filled tensor data.
MAX_ARRAY_ITEMS = 1 << 22
MAX_STRING_BYTES = 1 << 24
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, the smallest value (one byte)
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset
_STRING_LENGTH = struct.Struct("<Q")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ne: tuple[int, ...]  # ggml order: fastest dimension first
    type: GGMLQuantizationType
    offset: int  # absolute, in the file

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return int(np.prod(self.ne, dtype=np.int64)) // block * size


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    value_types: dict[str, GGUFValueType]
    tensors: dict[str, GGUFTensor]
    file_size: int
    array_types: dict[str, GGUFValueType] = field(default_factory=dict)  # item type of each ARRAY value
    data_offset: int = 0  # where the tensor data section starts (tensor offsets are absolute already)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get(Keys.General.ARCHITECTURE)

    def tensor_data(self, name: str) -> np.ndarray:
        """A tensor's raw bytes as a read-only view (F32/F16 as float arrays in ggml order)."""
        tensor = self.tensors[name]
        with open(self.path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if tensor.type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if tensor.type == GGMLQuantizationType.F32 else np.float16
            count = int(np.prod(tensor.ne, dtype=np.int64))
            return np.frombuffer(mapped, dtype=dtype, count=count, offset=tensor.offset).reshape(tensor.ne[::-1])
        return np.frombuffer(mapped, dtype=np.uint8, count=tensor.nbytes, offset=tensor.offset)


class _Corrupt(Exception):
    """Raised inside the parser; read_gguf_header turns it into one ModelError naming the file."""


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    @property
    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if size > self.left:
            raise _Corrupt("truncated")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def reserve(self, count: int, item_bytes: int, what: str) -> None:
        """Refuse a count whose items could not fit in the bytes left, before reading any of them."""
        if count * item_bytes > self.left:
            raise _Corrupt(f"{what} count {count} needs at least {count * item_bytes} bytes but only "
                           f"{self.left} are left")

    def string(self, what: str) -> str:
        n = self.take("<Q")
        if n > min(self.left, MAX_STRING_BYTES):
            raise _Corrupt(f"{what} length {n} is past the end of the file or over {MAX_STRING_BYTES} bytes")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def strings(self, count: int, what: str) -> list[str]:
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = _STRING_LENGTH.unpack_from
        for _ in range(count):  # the vocabulary: the one loop that must stay tight
            if pos + 8 > end:
                raise _Corrupt(f"truncated in {what}")
            (n,) = unpack(buf, pos)
            pos += 8
            if n > end - pos or n > MAX_STRING_BYTES:
                raise _Corrupt(f"a string in {what} has length {n}, past the end of the file")
            out.append(str(buf[pos:pos + n], "utf-8", "replace"))
            pos += n
        self.pos = pos
        return out

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.take("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise _Corrupt(f"{what} has unknown value type {raw}") from None


def read_gguf_header(path: Path | str) -> GGUFHeader:
    """Parse and validate a GGUF file's header; ModelError for anything that is not a complete GGUF."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise ModelError(f"{path}: not a GGUF file")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read ({exc})") from None
    view = memoryview(mapped)
    try:
        return _parse(view, path, size)
    except _Corrupt as exc:
        word = "truncated GGUF header" if str(exc) == "truncated" else f"corrupt GGUF header: {exc}"
        raise ModelError(f"{path}: {word} (re-convert or re-download it)") from None
    finally:
        view.release()
        mapped.close()


def _parse(buf: memoryview, path: Path, size: int) -> GGUFHeader:
    cur = _Cursor(buf)
    cur.pos = 4
    version = cur.take("<I")
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
    cur.reserve(n_kv, _MIN_KV_BYTES, "key-value")
    cur.reserve(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor")
    metadata, types, array_types = _read_metadata(cur, n_kv)
    entries = [_read_tensor_info(cur) for _ in range(n_tensors)]
    key = Keys.General.ALIGNMENT
    alignment = metadata.get(key, GGUF_DEFAULT_ALIGNMENT)
    if key in types and types[key] != GGUFValueType.UINT32:
        raise _Corrupt(f"{key} has type {types[key].name}, not UINT32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise ModelError(f"{path}: {key} {alignment!r} is not a power of two")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = _place_tensors(entries, data_start, alignment, size, path)
    return GGUFHeader(path, version, metadata, types, tensors, size, array_types, data_start)


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, GGUFValueType], dict[str, Any]]:
    metadata: dict[str, Any] = {}
    types: dict[str, GGUFValueType] = {}
    array_types: dict[str, GGUFValueType] = {}
    for _ in range(n_kv):
        key = cur.string("a key")
        if key in metadata:
            raise _Corrupt(f"the key {key!r} appears twice")
        vtype = cur.value_type(f"key {key!r}")
        types[key] = vtype
        if vtype == GGUFValueType.ARRAY:
            array_types[key], metadata[key] = _read_array(cur, key)
        elif vtype == GGUFValueType.STRING:
            metadata[key] = cur.string(f"the value of {key!r}")
        else:
            metadata[key] = cur.take(_SCALARS[vtype])
    return metadata, types, array_types


def _read_array(cur: _Cursor, key: str) -> tuple[GGUFValueType, list[Any]]:
    item_type = cur.value_type(f"the items of {key!r}")
    count = cur.take("<Q")
    if item_type == GGUFValueType.ARRAY:
        raise _Corrupt(f"{key!r} is an array of arrays, which llama.cpp cannot read")
    cur.reserve(count, 8 if item_type == GGUFValueType.STRING else _DTYPES[item_type].itemsize, f"array {key!r} item")
    if count > MAX_ARRAY_ITEMS:
        raise _Corrupt(f"array {key!r} claims {count} items, over the limit of {MAX_ARRAY_ITEMS}")
    if item_type == GGUFValueType.STRING:
        return item_type, cur.strings(count, f"array {key!r}")
    dtype = _DTYPES[item_type]
    items = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos)
    cur.pos += count * dtype.itemsize
    return item_type, items.tolist()


def _read_tensor_info(cur: _Cursor) -> tuple[str, tuple[int, ...], GGMLQuantizationType, int]:
    name = cur.string("a tensor name")
    if len(name.encode()) >= GGML_MAX_NAME:
        raise _Corrupt(f"tensor name {name[:80]!r} is longer than llama.cpp's {GGML_MAX_NAME - 1} bytes")
    n_dims = cur.take("<I")
    if n_dims > GGML_MAX_DIMS:
        raise _Corrupt(f"tensor {name} has {n_dims} dimensions (at most {GGML_MAX_DIMS})")
    cur.reserve(n_dims, 8, f"tensor {name} dimension")
    ne = tuple(cur.take("<Q") for _ in range(n_dims))
    n_elements = 1
    for dim in ne:
        n_elements *= dim
        if dim < 1 or n_elements > _INT64_MAX:
            raise _Corrupt(f"tensor {name} has shape {list(ne)}: every dimension must be positive and "
                           f"the element count below 2**63")
    raw_type = cur.take("<I")
    try:
        qtype = GGMLQuantizationType(raw_type)
        block, _ = GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor {name} has unknown tensor type {raw_type}") from None
    if ne and ne[0] % block:
        raise _Corrupt(f"tensor {name} of type {qtype.name} has rows of {ne[0]}, not a multiple of {block}")
    return name, ne, qtype, cur.take("<Q")


def _place_tensors(entries: list[tuple[str, tuple[int, ...], GGMLQuantizationType, int]], data_start: int,
                   alignment: int, size: int, path: Path) -> dict[str, GGUFTensor]:
    """Tensors with absolute offsets: unique names, aligned, inside the file, not overlapping."""
    tensors: dict[str, GGUFTensor] = {}
    for name, ne, qtype, relative in entries:
        if name in tensors:
            raise ModelError(f"{path}: the same tensor name appears twice ({name})")
        if relative % alignment:
            raise _Corrupt(f"tensor {name} starts at offset {relative}, not a multiple of the alignment {alignment}")
        tensors[name] = GGUFTensor(name, ne, qtype, data_start + relative)
    end_of_previous, previous = data_start, None
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if t.offset + t.nbytes > size:
            raise ModelError(f"{path}: truncated: tensor {t.name} ends at byte {t.offset + t.nbytes} but the "
                             f"file has {size} bytes (re-convert or re-download it)")
        if t.offset < end_of_previous:
            raise _Corrupt(f"tensor {t.name} overlaps tensor {previous}")
        end_of_previous, previous = t.offset + t.nbytes, t.name
    return tensors
