"""A streaming safetensors writer: header first, then each tensor's bytes in order, bounded memory."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import numpy as np

from pixtral_cpp.errors import OutputError

# safetensors dtype name -> bytes per element
DTYPE_SIZES: dict[str, int] = {"BF16": 2, "F16": 2, "F32": 4}
_HEADER_ALIGNMENT = 8  # the format pads the JSON header so tensor data starts 8-byte aligned


@dataclass(frozen=True)
class TensorEntry:
    """A tensor announced in the header before its bytes are written."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def encode_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """The length prefix and JSON header for tensors stored back to back in the given order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text


class SafetensorsStreamWriter:
    """Writes `path` via a temporary file that is renamed into place only when every tensor is complete.

    Use as a context manager and call `write_tensor` once per entry, in the entries' order.
    """

    def __init__(
        self, path: Path, entries: list[TensorEntry], metadata: dict[str, str] | None = None
    ) -> None:
        if len({entry.name for entry in entries}) != len(entries):
            raise OutputError(f"{path.name}: duplicate tensor names")
        self.path = path
        self.temp_path = path.with_name(f".{path.name}.tmp")
        self._entries = entries
        self._metadata = metadata if metadata is not None else {"format": "pt"}
        self._next = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> SafetensorsStreamWriter:
        self._file = open(self.temp_path, "wb")
        self._file.write(encode_header(self._entries, self._metadata))
        return self

    def write_tensor(self, name: str, chunks: Iterable[np.ndarray]) -> None:
        """Append one tensor from consecutive little-endian row chunks."""
        assert self._file is not None, "use SafetensorsStreamWriter as a context manager"
        if self._next >= len(self._entries) or self._entries[self._next].name != name:
            raise OutputError(f"{self.path.name}: tensor {name!r} written out of header order")
        written = 0
        for chunk in chunks:
            self._file.write(np.ascontiguousarray(chunk).data)
            written += chunk.nbytes
        expected = self._entries[self._next].nbytes
        if written != expected:
            raise OutputError(
                f"{self.path.name}: tensor {name!r} got {written} bytes, header says {expected}")
        self._next += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._file is not None
        self._file.close()
        if exc_type is not None:
            self.temp_path.unlink(missing_ok=True)
            return
        if self._next != len(self._entries):
            self.temp_path.unlink(missing_ok=True)
            missing = self._entries[self._next].name
            raise OutputError(f"{self.path.name}: closed before tensor {missing!r} was written")
        os.replace(self.temp_path, self.path)
