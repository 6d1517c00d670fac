"""A fast, validating GGUF reader: metadata and tensor directory, tensor data as mapped views.

Used to check files before llama.cpp sees them (llama.cpp aborts the process on some bad files)
and by `info`. gguf-py's GGUFReader builds a numpy view per array element and needs ~12 s for
Pixtral's 400k-entry vocabulary; this reads the same header in well under a second.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pixtral_cpp.errors import ModelError

GGUF_MAGIC = b"GGUF"
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


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

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

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


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF header (re-convert or re-download it)")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.path}: truncated GGUF header (re-convert or re-download it)")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: GGUFValueType) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            item_type = GGUFValueType(self.take("<I"))
            return [self.value(item_type) for _ in range(self.take("<Q"))]
        return self.take(_SCALARS[vtype])


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
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # unknown enums, garbage lengths, nesting
        raise ModelError(f"{path}: corrupt GGUF header ({exc})") from None
    finally:
        view.release()
        mapped.close()


def _parse(buf: memoryview, path: Path, size: int) -> GGUFHeader:
    cur = _Cursor(buf, path)
    cur.pos = 4
    version, n_tensors, n_kv = cur.take("<I"), cur.take("<Q"), cur.take("<Q")
    if version not in (2, 3):
        raise ModelError(f"{path}: GGUF version {version} is not supported")
    metadata, types = {}, {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = GGUFValueType(cur.take("<I"))
        types[key], metadata[key] = vtype, cur.value(vtype)
    entries = []
    for _ in range(n_tensors):
        name = cur.string()
        ne = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        entries.append((name, ne, GGMLQuantizationType(cur.take("<I")), cur.take("<Q")))
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelError(f"{path}: general.alignment {alignment!r} is not a power of two")
    if len({name for name, *_ in entries}) != len(entries):
        raise ModelError(f"{path}: the same tensor name appears twice")
    data_start = -(-cur.pos // alignment) * alignment
    tensors = {name: GGUFTensor(name, ne, qtype, data_start + off) for name, ne, qtype, off in entries}
    for t in tensors.values():
        if t.offset + t.nbytes > size:
            raise ModelError(f"{path}: truncated: tensor {t.name} ends at byte {t.offset + t.nbytes} but the "
                             f"file has {size} bytes (re-convert or re-download it)")
    return GGUFHeader(path, version, metadata, types, tensors, size)
