"""Reading GGUF files back in tests (through the project's fast header reader)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from pixtral_cpp.gguf_file import GGUFHeader, read_gguf_header


@dataclass(frozen=True)
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # ggml order
    data: np.ndarray  # float arrays for F32/F16 (torch order), raw bytes otherwise


@functools.lru_cache(maxsize=32)
def _cached(path: str, mtime_ns: int) -> GGUFHeader:
    return read_gguf_header(path)


def read_gguf(path: Path) -> GGUFHeader:
    return _cached(str(path), Path(path).stat().st_mtime_ns)


def field(reader: GGUFHeader, key: str) -> Any:
    assert key in reader.metadata, f"missing key {key}"
    return reader.metadata[key]


def field_type(reader: GGUFHeader, key: str) -> GGUFValueType:
    return reader.value_types[key]


def tensors(reader: GGUFHeader) -> dict[str, Tensor]:
    return {name: Tensor(name, t.type, t.ne, reader.tensor_data(name)) for name, t in reader.tensors.items()}


def tensor_bytes(t: Tensor) -> bytes:
    return np.ascontiguousarray(t.data).tobytes()


def ne(t: Tensor) -> list[int]:
    return [int(d) for d in t.shape]
