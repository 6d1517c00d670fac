"""The safetensors reader on corrupt headers: named cases, then a seeded, time-bounded fuzz.

Whatever the header says, opening the file either succeeds with tensors that can all be read, or raises a
CheckpointError whose message is one line naming the file. The reader is pure Python over json and mmap,
so the fuzz runs in-process: a crash would take pytest down with it and fail the run all the same.
"""

from __future__ import annotations

import json
import random
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pixtral_cpp.convert.safetensors_reader import SafetensorsFile
from pixtral_cpp.errors import CheckpointError, TensorError

FUZZ_SECONDS = 6.0
SEED = 20240917

# Three small tensors back to back: (name, dtype, shape).
TENSORS = [("a.weight", "F32", [4, 3]), ("b.weight", "BF16", [5]), ("c.bias", "F16", [2, 2, 2])]
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


def valid_header() -> tuple[dict[str, Any], bytes]:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in TENSORS:
        size = int(np.prod(shape)) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    return header, bytes(range(256))[:offset]


def encode(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    padded = header_text + b" " * (-len(header_text) % 8)
    return struct.pack("<Q", len(padded) if length is None else length) + padded + data


def header_bytes(header: Any) -> bytes:
    return json.dumps(header, allow_nan=True).encode()


def open_and_read_all(path: Path) -> int:
    """Open the file and touch every tensor's bytes; returns how many tensors it holds."""
    with SafetensorsFile(path) as f:
        for info in f.tensors.values():
            array = f.array(info)
            assert array.shape == info.shape and array.nbytes == info.nbytes
            array.sum()  # every byte is inside the mapping
            del array
        return len(f.tensors)


def assert_refused_cleanly(path: Path, error: CheckpointError) -> None:
    message = str(error)
    assert str(path) in message, message
    assert "\n" not in message and len(message) < 600, message


# --------------------------------------------------------------------------------------- named cases


def _set(key: str, field: str, value: Any):
    def edit(header: dict[str, Any]) -> None:
        header[key][field] = value
    return edit


def _offsets(key: str, fn):
    def edit(header: dict[str, Any]) -> None:
        header[key]["data_offsets"] = fn(header[key]["data_offsets"])
    return edit


NAMED_EDITS = {
    "string offsets": (_set("a.weight", "data_offsets", ["0", "48"]), "data_offsets"),
    "float offsets": (_set("a.weight", "data_offsets", [0.0, 48.0]), "data_offsets"),
    "bool offsets": (_set("a.weight", "data_offsets", [False, 48]), "data_offsets"),
    "one offset": (_set("a.weight", "data_offsets", [48]), "data_offsets"),
    "offsets not a list": (_set("a.weight", "data_offsets", {"0": 48}), "data_offsets"),
    "negative offset": (_offsets("b.weight", lambda o: [-10, o[1] - o[0] - 10]), "data_offsets"),
    "reversed offsets": (_offsets("b.weight", lambda o: [o[1], o[0]]), "data_offsets"),
    "overlapping offsets": (_offsets("b.weight", lambda o: [o[0] - 4, o[1] - 4]), "overlaps"),
    "hole between tensors": (_offsets("c.bias", lambda o: [o[0] + 2, o[1] + 2]), "truncated|belong to no tensor"),
    "offsets past the end": (_offsets("c.bias", lambda o: [o[0] + 10**6, o[1] + 10**6]), "truncated"),
    "huge offsets": (_offsets("c.bias", lambda o: [2**70, 2**70 + 16]), "truncated"),
    "inf dimension": (_set("a.weight", "shape", [float("inf"), 3]), "shape"),
    "float dimension": (_set("a.weight", "shape", [4.0, 3]), "shape"),
    "string dimension": (_set("a.weight", "shape", ["4", 3]), "shape"),
    "negative dimension": (_set("a.weight", "shape", [-4, -3]), "shape"),
    "int64-overflowing shape": (_set("a.weight", "shape", [2**40, 2**40, 2**40]), "spans 48 bytes"),
    "wrapping shape": (_set("a.weight", "shape", [2**32, 2**32, 12]), "spans 48 bytes"),
    "shape not matching bytes": (_set("a.weight", "shape", [4, 4]), "spans 48 bytes"),
    "too many dimensions": (_set("c.bias", "shape", [1] * 60 + [2, 2, 2]), "shape"),
    "unknown dtype": (_set("a.weight", "dtype", "F8_E4M3"), "dtype 'F8_E4M3'"),
    "dtype not a string": (_set("a.weight", "dtype", ["F32"]), "dtype"),
    "entry not an object": (lambda h: h.__setitem__("a.weight", [1, 2]), "malformed"),
    "metadata a list": (lambda h: h.__setitem__("__metadata__", ["format", "pt"]), "__metadata__"),
    "metadata values not strings": (lambda h: h.__setitem__("__metadata__", {"format": 1}), "__metadata__"),
}


@pytest.mark.parametrize("case", list(NAMED_EDITS))
def test_corrupt_header_entry(tmp_path, case):
    edit, expected = NAMED_EDITS[case]
    header, data = valid_header()
    edit(header)
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(header_bytes(header), data))
    with pytest.raises(TensorError, match=expected) as caught:
        open_and_read_all(path)
    assert_refused_cleanly(path, caught.value)


RAW_HEADERS = {
    "deep nesting": (b"[" * 200_000, "nested too deeply|not valid JSON"),
    "deep nesting in an entry": (b'{"a.weight": ' + b'{"x": ' * 100_000, "nested too deeply|not valid JSON"),
    "not utf-8": ('{"a.weight": "\udcff"}'.encode("utf-8", "surrogateescape"), "not UTF-8"),
    "repeated tensor name": (b'{"a.weight": {}, "a.weight": {}}', "'a.weight' appears twice"),
    "5000-digit number": (b'{"a.weight": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}}", "not valid JSON"),
    "a JSON list": (b"[]", "not a JSON object"),
    "empty": (b"", "not valid JSON"),
}


@pytest.mark.parametrize("case", list(RAW_HEADERS))
def test_unparseable_header(tmp_path, case):
    raw, expected = RAW_HEADERS[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(raw, b""))
    with pytest.raises(TensorError, match=expected) as caught:
        open_and_read_all(path)
    assert_refused_cleanly(path, caught.value)


@pytest.mark.parametrize("length", [2**64 - 1, 100 * 1024 * 1024 + 8, 10**9], ids=["u64-max", "over-100MB", "1GB"])
def test_header_length_beyond_the_file_is_refused_without_reading(tmp_path, length):
    """The length prefix is checked against the file size and the format's 100 MB cap before any read."""
    path = tmp_path / "model.safetensors"
    header, data = valid_header()
    path.write_bytes(encode(header_bytes(header), data, length=length))
    with pytest.raises(TensorError, match="not a safetensors file, or truncated") as caught:
        open_and_read_all(path)
    assert_refused_cleanly(path, caught.value)


def test_header_over_the_format_cap_in_a_large_sparse_file(tmp_path):
    """A 200 MB header in a (sparse) file that really is that large: refused by the cap, not read."""
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 200 * 1024 * 1024))
        f.truncate(300 * 1024 * 1024)
    started = time.monotonic()
    with pytest.raises(TensorError, match="header of 209715200 bytes"):
        open_and_read_all(path)
    assert time.monotonic() - started < 1.0


def test_trailing_bytes_are_refused(tmp_path):
    header, data = valid_header()
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(header_bytes(header), data + b"junk"))
    with pytest.raises(TensorError, match="4 bytes after the last tensor"):
        open_and_read_all(path)


def test_fifo_is_refused_without_blocking(tmp_path):
    import os

    path = tmp_path / "model.safetensors"
    os.mkfifo(path)
    with pytest.raises(TensorError, match="not a regular file"):
        open_and_read_all(path)


def test_valid_file_opens(tmp_path):
    header, data = valid_header()
    path = tmp_path / "model.safetensors"
    path.write_bytes(encode(header_bytes(header), data))
    assert open_and_read_all(path) == len(TENSORS)


# ---------------------------------------------------------------------------------------------- fuzz

ODD_VALUES: list[Any] = [
    0, 1, -1, 7, 2**31, 2**63, 2**64, -(2**63), 10**30, 0.5, -0.0, float("inf"), float("nan"), 1e308,
    "", "F32", "BF16", "I64", "0", "\x00", None, True, False, [], [0], [0, 0], [1, -1], [[]], {}, {"a": 1},
    [2**62, 2**62], ["a", "b"], [0.0, 1.0], [1e999], list(range(70)),
]


def _mutate_value(rng: random.Random, header: dict[str, Any]) -> None:
    name = rng.choice(list(header))
    entry = header[name]
    if not isinstance(entry, dict) or name == "__metadata__" or rng.random() < 0.1:
        header[name] = rng.choice(ODD_VALUES)
        return
    key = rng.choice(["dtype", "shape", "data_offsets", "extra"])
    roll = rng.random()
    if roll < 0.15:
        entry.pop(key, None)
    elif roll < 0.6 and isinstance(entry.get(key), list) and entry[key]:
        entry[key][rng.randrange(len(entry[key]))] = rng.choice(ODD_VALUES + [rng.randint(-64, 256)])
    else:
        entry[key] = rng.choice(ODD_VALUES)


def _with_offsets(header: dict[str, Any]) -> list[str]:
    """Names of entries an earlier mutation left with a list of offsets."""
    return [name for name, entry in header.items()
            if isinstance(entry, dict) and isinstance(entry.get("data_offsets"), list)]


def _swap_offsets(rng: random.Random, header: dict[str, Any]) -> None:
    if len(_with_offsets(header)) < 2:
        return
    a, b = rng.sample(_with_offsets(header), 2)
    header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]


def _shift_offsets(rng: random.Random, header: dict[str, Any]) -> None:
    if not _with_offsets(header):
        return
    name = rng.choice(_with_offsets(header))
    delta = rng.choice([-8, -2, -1, 1, 2, 8, 2**33])
    header[name]["data_offsets"] = [o + delta * rng.randint(0, 1) if isinstance(o, int) else o
                                    for o in header[name]["data_offsets"]]


def _add_tensor(rng: random.Random, header: dict[str, Any]) -> None:
    header[f"extra.{rng.randrange(100)}"] = {"dtype": rng.choice(["F32", "F16", "U8"]),
                                              "shape": [rng.randint(0, 4)], "data_offsets": [0, rng.randint(0, 8)]}


def _mutate_bytes(rng: random.Random, raw: bytearray) -> None:
    for _ in range(rng.randint(1, 4)):
        if not raw:
            return
        roll, at = rng.random(), rng.randrange(len(raw))
        if roll < 0.5:
            raw[at] = rng.randrange(256)
        elif roll < 0.7:
            del raw[at:at + rng.randint(1, 16)]
        elif roll < 0.85:
            raw[at:at] = rng.choice([b"[" * 3000, b'"', b"\\u", b"\xff", b"1e999", b",", b"{", b'"a":1,"a":2,'])
        else:
            raw[at:at] = raw[at:at + rng.randint(1, 32)]


def _fuzz_case(rng: random.Random) -> bytes:
    header, data = valid_header()
    for _ in range(rng.randint(1, 3)):
        rng.choice([_mutate_value, _mutate_value, _swap_offsets, _shift_offsets, _add_tensor])(rng, header)
    raw = bytearray(header_bytes(header))
    if rng.random() < 0.3:
        _mutate_bytes(rng, raw)
    length = None
    if rng.random() < 0.1:
        length = rng.choice([0, 1, 7, len(raw) + 1, len(raw) - 1, 2**63, 2**64 - 1, rng.randrange(2**20)])
    blob = encode(bytes(raw), data, length)
    if rng.random() < 0.1:
        blob = blob[:rng.randrange(len(blob) + 1)]
    return blob


def test_fuzzed_headers_open_or_raise_checkpoint_errors(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "fuzz.safetensors"
    opened = refused = 0
    deadline = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < deadline:
        blob = _fuzz_case(rng)
        path.write_bytes(blob)
        try:
            open_and_read_all(path)
        except CheckpointError as error:
            assert_refused_cleanly(path, error)
            refused += 1
        except Exception as error:  # noqa: BLE001 - the point: anything else is a bug, reported with its input
            pytest.fail(f"{type(error).__name__}: {error} for file bytes {blob[:300]!r}")
        else:
            opened += 1
    assert refused > 500 and opened > 0, (opened, refused)
