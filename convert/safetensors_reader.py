"""A memory-mapped safetensors reader that validates before anything is read.

Tensors are views into the mapped file: nothing is copied until a row range is converted, so
peak memory does not grow with the checkpoint. bf16 stays as its raw 16-bit pattern (numpy has
no bfloat16) and is widened to float32 only where a conversion needs it.
"""

from __future__ import annotations

import math
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pixtral_cpp.convert.json_files import brief, parse_json
from pixtral_cpp.errors import TensorError

# safetensors dtype -> (numpy storage dtype, bytes per element)
_STORAGE = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; see widen_to_float32
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the format's own limit
_MAX_DIMS = 8  # no Pixtral tensor has more than 4; numpy refuses more than 64


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
        return math.prod(self.shape)


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
    """Parse and check the header; nothing beyond its (bounded) bytes is read."""
    try:
        info = os.stat(path)  # before open(): opening a FIFO would block
        if not stat.S_ISREG(info.st_mode):
            raise TensorError(f"{path}: not a regular file")
        size = info.st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise TensorError(f"{path}: file too short to be safetensors ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, size - 8):
                raise TensorError(f"{path}: not a safetensors file, or truncated "
                                  f"(header of {header_len} bytes in a file of {size} bytes)")
            raw = f.read(header_len)
    except OSError as exc:
        raise TensorError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header = parse_json(raw, f"{path}: corrupt safetensors header", TensorError)
    if not isinstance(header, dict):
        raise TensorError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = _metadata(path, header.pop("__metadata__", None))
    data_start = 8 + header_len
    tensors = {name: _tensor_info(path, name, entry, data_start, size) for name, entry in header.items()}
    _check_tiling(path, tensors, data_start, size)
    return tensors, metadata


def _metadata(path: Path, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise TensorError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings, "
                          f"got {brief(value)}")
    return value


def _quoted(name: str) -> str:
    """A tensor name as error messages show it: quoted, and escaped and cut when it is not plain."""
    return f"'{name}'" if name.isprintable() and len(name) <= 200 else brief(name, 200)


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, file_size: int) -> TensorInfo:
    where = f"{path}: tensor {_quoted(name)}"
    if not isinstance(entry, dict):
        raise TensorError(f"{where} has a malformed header entry: {brief(entry)}")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _STORAGE:
        raise TensorError(f"{where} has dtype {brief(dtype)}; expected one of {sorted(_STORAGE)}")
    # 2.5, "5", true and 1e999 (inf) are no dimension; Python ints cannot overflow in the product below.
    if not _is_int_list(shape) or len(shape) > _MAX_DIMS or any(d < 0 for d in shape):
        raise TensorError(f"{where} has shape {brief(shape)}; expected a list of at most {_MAX_DIMS} "
                          f"non-negative integers")
    if not _is_int_list(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
        raise TensorError(f"{where} has data_offsets {brief(offsets)}; expected [begin, end] with "
                          f"0 <= begin <= end")
    begin, end = offsets
    if data_start + end > file_size:
        raise TensorError(f"{path}: truncated: tensor {_quoted(name)} ends at byte {data_start + end} "
                          f"but the file has {file_size} bytes (re-download it)")
    expected = math.prod(shape) * _STORAGE[dtype].itemsize
    if end - begin != expected:
        raise TensorError(f"{where} spans {end - begin} bytes; shape {brief(shape)} of {dtype} needs {expected}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + begin, expected)


def _check_tiling(path: Path, tensors: dict[str, TensorInfo], data_start: int, file_size: int) -> None:
    """The format's rule: tensors cover the data area exactly, without overlaps or holes (no polyglot files)."""
    cursor, previous = data_start, None
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        if info.start < cursor:
            raise TensorError(f"{path}: tensor {_quoted(info.name)} overlaps tensor {_quoted(previous or '')} "
                              f"(corrupt header)")
        if info.start > cursor:
            raise TensorError(f"{path}: bytes {cursor - data_start}..{info.start - data_start} of the data "
                              f"belong to no tensor (corrupt header, before tensor {_quoted(info.name)})")
        cursor, previous = info.start + info.nbytes, info.name
    if cursor != file_size:
        raise TensorError(f"{path}: {file_size - cursor} bytes after the last tensor belong to no tensor "
                          f"(corrupt or not a safetensors file)")


def widen_to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32 (bf16 bits shifted into the high half of a float32)."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)
