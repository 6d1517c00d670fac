"""A memory-mapped safetensors reader that validates before anything is read.

Tensors are views into the mapped file: nothing is copied until a row range is converted, so
peak memory does not grow with the checkpoint. bf16 stays as its raw 16-bit pattern (numpy has
no bfloat16) and is widened to float32 only where a conversion needs it.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixtral_cpp.errors import TensorError

# safetensors dtype -> (numpy storage dtype, bytes per element)
_STORAGE = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; see widen_to_float32
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file, located but not read."""

    name: str
    dtype: str  # "BF16", "F16" or "F32"
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


class SafetensorsFile:
    """An open, validated, memory-mapped safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.tensors, self.metadata = _read_header(self.path)
        self._file = open(self.path, "rb")
        size = self.path.stat().st_size
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:  # arrays still view it; the mapping goes when they do
                pass
            self._map = None
        self._file.close()

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prefetch(self, info: TensorInfo) -> None:
        """Ask the kernel to start reading the tensor now, while the one before it is converted."""
        if self._map is None:
            return
        start = info.start - info.start % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_WILLNEED, start, info.start + info.nbytes - start)

    def release(self, info: TensorInfo) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page cache).

        Without this, every mapped page read counts towards RSS until the file is closed, and peak
        memory would grow with the checkpoint instead of with the largest tensor.
        """
        if self._map is None:
            return
        start = info.start - info.start % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_DONTNEED, start, info.start + info.nbytes - start)

    def array(self, info: TensorInfo) -> np.ndarray:
        """The tensor as a read-only array view in its storage dtype (bf16 as uint16 bits)."""
        assert self._map is not None, "file is closed"
        flat = np.frombuffer(self._map, dtype=_STORAGE[info.dtype], count=info.num_elements, offset=info.start)
        return flat.reshape(info.shape)


def _read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise TensorError(f"{path}: file too short to be safetensors ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise TensorError(f"{path}: not a safetensors file, or truncated "
                                  f"(header of {header_len} bytes in a file of {size} bytes)")
            header = json.loads(f.read(header_len).decode("utf-8"))
    except OSError as exc:
        raise TensorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TensorError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise TensorError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, file_size: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
    except (KeyError, TypeError, ValueError):
        raise TensorError(f"{path}: tensor '{name}' has a malformed header entry: {entry!r}") from None
    if dtype not in _STORAGE:
        raise TensorError(f"{path}: tensor '{name}' has dtype {dtype}; expected one of {sorted(_STORAGE)}")
    expected = int(np.prod(shape, dtype=np.int64)) * _STORAGE[dtype].itemsize
    if end - begin != expected or begin < 0:
        raise TensorError(f"{path}: tensor '{name}' spans {end - begin} bytes; shape {list(shape)} "
                          f"of {dtype} needs {expected}")
    if data_start + end > file_size:
        raise TensorError(f"{path}: truncated: tensor '{name}' ends at byte {data_start + end} "
                          f"but the file has {file_size} bytes (re-download it)")
    return TensorInfo(name, dtype, shape, path, data_start + begin, expected)


def widen_to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32 (bf16 bits shifted into the high half of a float32)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)
