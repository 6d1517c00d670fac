"""Reading GGUF files back in tests (through the project's fast header reader)."""

from __future__ import annotations

import functools
import shutil
import struct
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


# -- writing mutated copies (tests of what the runtime refuses) ---------------------------------------

DELETE = object()  # rewrite_metadata(..., value=DELETE) drops the key
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}


def _string_bytes(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _value_bytes(value: Any, vtype: GGUFValueType, item_type: GGUFValueType | None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string_bytes(value)
    if vtype == GGUFValueType.ARRAY:
        assert item_type is not None
        items = b"".join(_value_bytes(v, item_type, None) for v in value)
        return struct.pack("<IQ", item_type, len(value)) + items
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype == GGUFValueType.STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype == GGUFValueType.ARRAY:
        item, count = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        if item != GGUFValueType.STRING:
            return pos + count * struct.calcsize(_SCALAR_FORMATS[GGUFValueType(item)])
        for _ in range(count):
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        return pos
    return pos + struct.calcsize(_SCALAR_FORMATS[GGUFValueType(vtype)])


def _header_layout(buf: bytes, n_kv: int) -> tuple[dict[str, tuple[int, int, int]], int]:
    """Each key's (start, end, type) in a valid file's header bytes, and where the key-value section ends."""
    spans, pos = {}, 24
    for _ in range(n_kv):
        start, length = pos, struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8:pos + 8 + length].decode()
        (vtype,) = struct.unpack_from("<I", buf, pos + 8 + length)
        pos = _skip_value(buf, pos + 12 + length, vtype)
        spans[key] = (start, pos, vtype)
    return spans, pos


def rewrite_metadata(src: Path, dst: Path, key: str, value: Any = DELETE, vtype: GGUFValueType | None = None,
                     item_type: GGUFValueType | None = None) -> Path:
    """Copy ``src`` to ``dst`` with one metadata value replaced (its type kept unless ``vtype`` is given),
    added, or dropped (``DELETE``); every other header byte and the tensor data are copied unchanged."""
    header = read_gguf(src)
    with open(src, "rb") as f:
        buf = f.read(header.data_offset)
    spans, kv_end = _header_layout(buf, len(header.metadata))
    start, end = spans[key][:2] if key in spans else (kv_end, kv_end)
    new_kv = b""
    if value is not DELETE:
        vtype = vtype or header.value_types.get(key)
        item_type = item_type or header.array_types.get(key)
        assert vtype is not None, f"give the GGUF type of the new key {key}"
        new_kv = _string_bytes(key) + struct.pack("<I", vtype) + _value_bytes(value, vtype, item_type)
    n_kv = len(header.metadata) + (key not in spans) - (value is DELETE)
    tensor_infos = b"".join(_string_bytes(t.name) + struct.pack(f"<I{len(t.ne)}QIQ", len(t.ne), *t.ne, t.type,
                                                                  t.offset - header.data_offset)
                            for t in header.tensors.values())
    out = bytearray(buf[:16] + struct.pack("<Q", n_kv) + buf[24:start] + new_kv + buf[end:kv_end] + tensor_infos)
    out += b"\0" * (-len(out) % header.get("general.alignment", 32))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.write(out)
        fin.seek(header.data_offset)
        shutil.copyfileobj(fin, fout, 16 << 20)
    return dst


def fill_tensor(src: Path, dst: Path, name: str, value: float) -> Path:
    """Copy ``src`` to ``dst`` with every element of the F16/F32 tensor ``name`` set to ``value`` (e.g. NaN)."""
    shutil.copyfile(src, dst)
    tensor = read_gguf_header(dst).tensors[name]
    dtype = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}[tensor.type]
    with open(dst, "r+b") as f:
        f.seek(tensor.offset)
        f.write(np.full(int(np.prod(tensor.ne)), value, dtype=dtype).tobytes())
    return dst
