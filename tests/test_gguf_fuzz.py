"""Seeded fuzzing of the GGUF header reader: a corrupt header gives ModelError, quickly, never anything else.

The loop runs in a child interpreter (with an address-space limit) so that a crash signal or a memory
blow-up fails the test instead of killing pytest. Mutations of the tiny mmproj and of the tiny text
model's header: bit flips, counts and lengths replaced with huge values, type fields changed, truncation.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pixtral_cpp.errors import ModelError
from pixtral_cpp.gguf_file import read_gguf_header
from tests.gguf_helpers import _header_layout

SEED = 9
BUDGET_S = 8.0
SLOWEST_READ_S = 1.0

_FUZZ = r'''
import json, random, resource, struct, sys, time, traceback
from pathlib import Path

resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))  # a runaway allocation fails here, not the machine
from pixtral_cpp.errors import ModelError
from pixtral_cpp.gguf_file import read_gguf_header
from pixtral_cpp.model_files import read_text_info, read_vision_info
from tests.gguf_helpers import _header_layout

seed, budget, slowest_allowed, work = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
sources = [(Path(p), reader) for p, reader in zip(sys.argv[5::2], sys.argv[6::2])]
rng = random.Random(seed)
originals = []
for path, reader in sources:
    header = read_gguf_header(path)
    raw = path.read_bytes()[:header.data_offset]
    spans, kv_end = _header_layout(raw, len(header.metadata))
    originals.append((raw, header.file_size, spans, kv_end, reader))

def u64_fields(raw, spans):
    """Offsets of count-like u64 fields: tensor/kv counts, key lengths, string lengths, array counts."""
    fields = [8, 16]
    for start, end, vtype in spans.values():
        fields.append(start)
        key_len = struct.unpack_from("<Q", raw, start)[0]
        value = start + 12 + key_len
        if vtype == 8:
            fields.append(value)
        elif vtype == 9:
            fields += [value + 4]
            if struct.unpack_from("<I", raw, value)[0] == 8:
                fields.append(value + 12)  # the first string's length
    return fields

def type_fields(raw, spans):
    out = []
    for start, end, vtype in spans.values():
        value = start + 12 + struct.unpack_from("<Q", raw, start)[0]
        out.append(value - 4)
        if vtype == 9:
            out.append(value)
    return out

def mutate(raw, spans, kv_end):
    data = bytearray(raw)
    kind = rng.choice(["flip", "count", "type", "truncate", "tensor"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif kind == "count":
        big = rng.choice([2**64 - 1, 2**63, 2**40, 2**32 + 1, len(data) * 4, rng.getrandbits(64)])
        struct.pack_into("<Q", data, rng.choice(u64_fields(raw, spans)), big)
    elif kind == "type":
        struct.pack_into("<I", data, rng.choice(type_fields(raw, spans)), rng.choice([9, 12, 13, 255, 2**32 - 1]))
    elif kind == "tensor":  # the tensor directory: dims, types and offsets
        pos = rng.randrange(kv_end, len(data) - 8)
        struct.pack_into("<Q", data, pos, rng.choice([0, 2**63 + 5, 2**62, 7, rng.getrandbits(64)]))
    else:
        del data[rng.randrange(4, len(data)):]
        return kind, bytes(data), None
    return kind, bytes(data), "pad"

failures, counts, slow_kinds, slowest, deadline = [], {}, {}, 0.0, time.monotonic() + budget
target = work / "fuzzed.gguf"
i = 0
while time.monotonic() < deadline:
    raw, size, spans, kv_end, reader = originals[0 if i % 8 else 1]  # the mmproj is 40x faster to rewrite and read
    i += 1
    kind, data, pad = mutate(raw, spans, kv_end)
    with open(target, "wb") as f:
        f.write(data)
        if pad:
            f.truncate(size)  # sparse: the tensor data is not needed to read a header
    started = time.perf_counter()
    try:
        (read_vision_info if reader == "vision" else read_text_info)(target)
        outcome = "read"
    except ModelError as exc:
        outcome = "refused"
        if "\n" in str(exc):
            failures.append(f"{kind}: multi-line message {str(exc)[:200]!r}")
    except BaseException:
        failures.append(f"{kind}: {traceback.format_exc(limit=4)[-800:]}")
        outcome = "error"
    took = time.perf_counter() - started
    slowest = max(slowest, took)
    slow_kinds[f"{reader}-{kind}"] = max(slow_kinds.get(f"{reader}-{kind}", 0), round(took, 3))
    if took > slowest_allowed:
        failures.append(f"{kind}: took {took:.2f} s")
    counts[outcome] = counts.get(outcome, 0) + 1
# VmHWM, not ru_maxrss: Linux folds the parent's resident size into the child's ru_maxrss at exec
# (a vfork'ed child shares the parent's memory until then), so pytest's own gigabytes would count.
peak_mb = next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')) / 1024
print(json.dumps({"cases": i, "counts": counts, "failures": failures[:5], "slowest": slowest, "by_kind": slow_kinds,
                  "peak_mb": peak_mb}))
'''


def test_fuzzed_headers_give_model_error_quickly(pair, tmp_path):
    text, mmproj = pair
    args = [str(SEED), str(BUDGET_S), str(SLOWEST_READ_S), str(tmp_path), str(mmproj), "vision", str(text), "text"]
    run = subprocess.run([sys.executable, "-c", _FUZZ, *args], capture_output=True, text=True,
                         timeout=BUDGET_S + 60, cwd=Path(__file__).parent.parent)
    assert run.returncode == 0, f"the fuzz loop died ({run.returncode}): {run.stderr[-3000:]}"
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], report
    assert report["counts"].get("refused", 0) > 50, report  # the mutations do reach the checks
    assert report["peak_mb"] < 1500, report


@pytest.mark.parametrize(("item_type", "count", "words"), [
    (8, 2**40, r"count 1099511627776 needs at least \d+ bytes but only \d+ are left"),  # strings
    (4, 2**40, r"count 1099511627776 needs at least \d+ bytes but only \d+ are left"),  # UINT32
    (8, 12_000_000, r"claims 12000000 items, over the limit"),  # fits in the file: 12M empty strings
])
def test_huge_array_count_in_a_large_file_is_refused_at_once(tmp_path, item_type, count, words):
    path = tmp_path / "huge.gguf"
    key = b"tokenizer.ggml.tokens"
    with open(path, "wb") as f:
        f.write(b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little"))
        f.write(len(key).to_bytes(8, "little") + key + (9).to_bytes(4, "little"))
        f.write(item_type.to_bytes(4, "little") + count.to_bytes(8, "little"))
        f.truncate(100 << 20)  # 100 MB of zeros (sparse): the old reader walked all of it
    started = time.perf_counter()
    with pytest.raises(ModelError, match=r"corrupt GGUF header: array 'tokenizer\.ggml\.tokens' .*" + words):
        read_gguf_header(path)
    assert time.perf_counter() - started < 0.2


def _with_tensor_info(src: Path, dst: Path, name: str, *, n_dims: int | None = None, ne: tuple[int, ...] = (),
                      qtype: int | None = None, offset: int | None = None) -> Path:
    """Copy of ``src`` whose directory entry for tensor ``name`` is changed (raw fields, unchecked)."""
    header = read_gguf_header(src)
    raw = src.read_bytes()
    _, kv_end = _header_layout(raw[:header.data_offset], len(header.metadata))
    infos = b""
    for t in header.tensors.values():
        dims = ne or t.ne if t.name == name else t.ne
        count = n_dims if t.name == name and n_dims is not None else len(dims)
        kind = qtype if t.name == name and qtype is not None else t.type
        where = offset if t.name == name and offset is not None else t.offset - header.data_offset
        infos += struct.pack("<Q", len(t.name)) + t.name.encode() + struct.pack(
            f"<I{len(dims)}QIQ", count, *dims, kind, where)
    out = raw[:kv_end] + infos
    out += b"\0" * (-len(out) % 32)
    dst.write_bytes(out + raw[header.data_offset:])
    return dst


_DIRECTORY_CASES = {
    "five-dims": (dict(n_dims=5, ne=(16, 16, 3, 256, 1)), r"has 5 dimensions \(at most 4\)"),
    "zero-dim": (dict(ne=(0, 256)), r"has shape \[0, 256\]: every dimension must be positive"),
    "overflowing-dims": (dict(ne=(2**62, 2**62)), "the element count below 2"),
    "unknown-type": (dict(qtype=99), "has unknown tensor type 99"),
    "unaligned-offset": (dict(offset=7), "starts at offset 7, not a multiple of the alignment 32"),
    "overlapping": (dict(offset=0), "overlaps tensor"),
    "past-the-end": (dict(offset=2**40), "truncated: tensor mm.1.weight ends at byte"),
}


@pytest.mark.parametrize("case", sorted(_DIRECTORY_CASES))
def test_bad_tensor_directory_entries_are_refused(pair, tmp_path, case):
    changes, words = _DIRECTORY_CASES[case]
    bad = _with_tensor_info(pair[1], tmp_path / "bad.gguf", "mm.1.weight", **changes)
    with pytest.raises(ModelError, match=words) as raised:
        read_gguf_header(bad)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("type", 13, r"key 'clip\.vision\.patch_size' has unknown value type 13"),
    ("nested", 9, r"'clip\.vision\.image_mean' is an array of arrays"),
])
def test_unknown_and_nested_value_types_are_refused(pair, tmp_path, field, value, words):
    header = read_gguf_header(pair[1])
    raw = bytearray(pair[1].read_bytes())
    spans, _ = _header_layout(bytes(raw[:header.data_offset]), len(header.metadata))
    key = "clip.vision.patch_size" if field == "type" else "clip.vision.image_mean"
    start = spans[key][0]
    type_at = start + 8 + len(key) + (4 if field == "nested" else 0)  # the value type, or the item type
    struct.pack_into("<I", raw, type_at, value)
    (tmp_path / "bad.gguf").write_bytes(raw)
    with pytest.raises(ModelError, match=words):
        read_gguf_header(tmp_path / "bad.gguf")
