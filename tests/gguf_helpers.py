"""Reading GGUF files back in tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np


def read_gguf(path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(path)


def field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    assert f is not None, f"missing key {key}"
    return f.contents()


def field_type(reader: gguf.GGUFReader, key: str) -> gguf.GGUFValueType:
    f = reader.get_field(key)
    assert f is not None, f"missing key {key}"
    return f.types[0]


def tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


def tensor_bytes(t: gguf.ReaderTensor) -> bytes:
    return np.ascontiguousarray(t.data).tobytes()


def ne(t: gguf.ReaderTensor) -> list[int]:
    """ggml dimension order (fastest first)."""
    return [int(d) for d in t.shape]
