"""The prompt cache's store on its own (pixtral_cpp.disk_cache, no llama.cpp): naming, checks before anything
is handed on, eviction, concurrent processes, storing that fails without failing anything else."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pixtral_cpp import disk_cache
from pixtral_cpp.disk_cache import DiskCache, entries, evict, identity_digest, prefix_digests

IDENTITY = identity_digest([], {"kv_cache_type": "f16"})
PROMPT = [1, 3, *["img:aa"] * 6, 13, 50, 51, 4]


def state(n: int, fill: int = 7) -> bytearray:
    return bytearray([fill]) * n


def stored(folder: Path, keys=PROMPT, payload: bytearray | None = None, max_bytes: int = 1 << 30) -> Path:
    cache = DiskCache(folder, IDENTITY, max_bytes)
    cache.store(keys, payload if payload is not None else state(1000))
    cache.flush()
    return folder / disk_cache.entry_name(IDENTITY, len(keys), prefix_digests(IDENTITY, keys, [len(keys)])[len(keys)])


def lookup(folder: Path, keys=PROMPT, identity: bytes = IDENTITY):
    return DiskCache(folder, identity, 1 << 30).longest_prefix(keys, lambda n: True)


def test_a_stored_prefix_is_found_for_every_prompt_that_starts_with_it(tmp_path):
    stored(tmp_path, PROMPT[:8], state(500, 1))
    stored(tmp_path, PROMPT, state(900, 2))
    longest = lookup(tmp_path, [*PROMPT, 60, 61])
    assert longest is not None and longest.positions == len(PROMPT) and longest.state == state(900, 2)
    other_question = lookup(tmp_path, [*PROMPT[:8], 13, 99, 4])
    assert other_question is not None and other_question.positions == 8 and other_question.state == state(500, 1)


@pytest.mark.parametrize("prompt", [
    [1, 3, *["img:bb"] * 6, 13, 50, 51, 4],  # another image
    [1, 5, 3, *["img:aa"] * 6, 13, 50, 51, 4],  # other text before the image
    [1, 3, *["img:aa"] * 5],  # shorter than every entry
])
def test_a_prompt_that_does_not_start_with_a_stored_prefix_misses(tmp_path, prompt):
    stored(tmp_path, PROMPT[:8])
    assert lookup(tmp_path, prompt) is None


def test_another_model_or_setting_misses(tmp_path):
    stored(tmp_path)
    assert lookup(tmp_path, identity=identity_digest([], {"kv_cache_type": "f32"})) is None


def test_a_changed_file_changes_the_identity(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF" + bytes(100))
    before = identity_digest([model], {})
    os.utime(model, ns=(10**9, 10**9))
    touched = identity_digest([model], {})
    model.write_bytes(b"GGUF" + bytes(99) + b"\1")  # same size ...
    os.utime(model, ns=(10**9, 10**9))  # ... and time: the hash of its first MiB tells
    assert len({before, touched, identity_digest([model], {})}) == 3


def test_a_token_id_and_an_image_key_never_hash_alike():
    digests = [prefix_digests(IDENTITY, keys, [len(keys)])[len(keys)] for keys in ([1, 2], ["1", 2], [12], ["12"])]
    assert len(set(digests)) == 4


def test_prefix_digests_equal_digests_of_the_prefixes():
    at = prefix_digests(IDENTITY, PROMPT, [2, 8, len(PROMPT), 99])
    assert sorted(at) == [2, 8, len(PROMPT)]
    assert all(at[n] == prefix_digests(IDENTITY, PROMPT[:n], [n])[n] for n in at)


# -- what is never handed on -------------------------------------------------------------------------------

def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-10] ^= 0x40
    path.write_bytes(data)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def foreign(path: Path) -> None:
    path.write_bytes(b"GGUF" + bytes(2000))


def older_version(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[8] += 1  # the version field, right after the magic (the header's CRC then fails too)
    path.write_bytes(data)


@pytest.mark.parametrize("damage", [corrupt, truncate, empty, foreign, older_version])
def test_a_damaged_entry_is_ignored_with_one_log_line_and_removed(tmp_path, caplog, damage):
    path = stored(tmp_path)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="pixtral_cpp.disk_cache"):
        assert lookup(tmp_path) is None
    (record,) = caplog.records  # one line, naming the entry
    assert path.name in record.getMessage() and "ignored and removed" in record.getMessage()
    assert not path.exists()


def test_a_damaged_entry_does_not_hide_a_shorter_good_one(tmp_path):
    stored(tmp_path, PROMPT[:8], state(500, 1))
    corrupt(stored(tmp_path))
    hit = lookup(tmp_path)
    assert hit is not None and hit.positions == 8


def test_an_entry_renamed_to_another_prompts_name_is_refused(tmp_path):
    path = stored(tmp_path, PROMPT[:8])
    other = [1, 3, *["img:bb"] * 6]
    digest = prefix_digests(IDENTITY, other, [8])[8]
    path.rename(tmp_path / disk_cache.entry_name(IDENTITY, 8, digest))
    assert lookup(tmp_path, [*other, 13, 4]) is None and entries(tmp_path) == []


# -- bounded in bytes, least recently used first ------------------------------------------------------------

def test_the_least_recently_used_entries_are_evicted_to_stay_within_the_limit(tmp_path):
    limit = 2 * (1000 + 200)  # room for two entries of 1000 bytes and their headers
    prompts = [[1, 3, *[f"img:{n}"] * 6] for n in range(3)]
    for n in range(2):
        os.utime(stored(tmp_path, prompts[n], max_bytes=limit), (time.time() - 100 + n,) * 2)
    assert lookup(tmp_path, [*prompts[0], 4]) is not None  # a hit makes the first the most recent
    stored(tmp_path, prompts[2], max_bytes=limit)
    left = entries(tmp_path)
    assert sum(e.size for e in left) <= limit
    assert lookup(tmp_path, [*prompts[1], 4]) is None  # the least recently used went
    assert lookup(tmp_path, [*prompts[0], 4]) is not None and lookup(tmp_path, [*prompts[2], 4]) is not None


def test_an_entry_larger_than_the_whole_cache_is_not_stored(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pixtral_cpp.disk_cache"):
        cache = DiskCache(tmp_path, IDENTITY, 500)
        cache.store(PROMPT, state(1000))
        cache.flush()
    assert entries(tmp_path) == [] and "exceed the cache's limit" in caplog.text


def test_eviction_removes_temp_files_of_writers_that_died(tmp_path):
    left = tmp_path / ".x.pxkv.123.456.partial"
    left.write_bytes(b"half")
    fresh = tmp_path / ".y.pxkv.123.789.partial"
    fresh.write_bytes(b"being written")
    os.utime(left, (time.time() - 2 * disk_cache.STALE_PARTIAL_SECONDS,) * 2)
    evict(tmp_path, 1 << 30)
    assert not left.exists() and fresh.exists()


# -- storing fails, nothing else does ------------------------------------------------------------------------

def test_a_full_disk_skips_storing_with_a_log_line(tmp_path, monkeypatch, caplog):
    # /dev/full: every write fails with ENOSPC, as on a full disk (the kernel's, not a simulation of it)
    monkeypatch.setattr(disk_cache, "open_partial", lambda path: open("/dev/full", "wb"))  # noqa: SIM115
    with caplog.at_level(logging.WARNING, logger="pixtral_cpp.disk_cache"):
        cache = DiskCache(tmp_path, IDENTITY, 1 << 30)
        cache.store(PROMPT, state(100_000))
        cache.flush()
    assert "No space left on device" in caplog.text and "not storing" in caplog.text
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_be_made_skips_storing_and_reads_nothing(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="pixtral_cpp.disk_cache"):
        for folder in (blocker, blocker / "below"):
            cache = DiskCache(folder, IDENTITY, 1 << 30)
            cache.store(PROMPT, state(100))
            cache.flush()
            assert cache.longest_prefix(PROMPT, lambda n: True) is None
    assert caplog.text.count("not storing") == 2 and blocker.read_text() == "not a folder"


# -- several processes on one folder ---------------------------------------------------------------------------

WORKER = """
import json, sys
from pathlib import Path
from pixtral_cpp.disk_cache import DiskCache, identity_digest
folder, me = Path(sys.argv[1]), int(sys.argv[2])
cache = DiskCache(folder, identity_digest([], {"kv_cache_type": "f16"}), 6 * 40_200)  # room for ~6 of 16 entries
seen = {"hits": 0, "bad": 0}
for round in range(30):
    n = (round * 7 + me) % 16
    keys = [1, 3] + [f"img:{n}"] * 6
    hit = cache.longest_prefix(keys + [4], lambda length: True)
    if hit is not None:
        seen["hits"] += 1
        seen["bad"] += hit.state != bytearray([n]) * 40_000
    cache.store(keys, bytearray([n]) * 40_000)
cache.flush()
print(json.dumps(seen))
"""


def test_concurrent_processes_share_a_folder_without_corrupting_or_blocking_it(tmp_path):
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(me)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for me in range(4)]
    results = [worker.communicate(timeout=120) for worker in workers]
    assert all(worker.returncode == 0 for worker in workers), [err for _, err in results]
    assert "Traceback" not in "".join(err for _, err in results)
    seen = [json.loads(out) for out, _ in results]
    assert sum(s["hits"] for s in seen) > 0 and sum(s["bad"] for s in seen) == 0
    left = entries(tmp_path)
    # writers that publish at once may pass the limit for a moment; the last one's eviction settles it
    assert sum(e.size for e in left) <= 6 * 40_200 and not [n for n in os.listdir(tmp_path) if n.endswith(".partial")]
    for k in range(16):  # every entry that stayed is whole and holds what its writer stored
        hit = lookup(tmp_path, [1, 3, *[f"img:{k}"] * 6, 4])
        assert hit is None or hit.state == bytearray([k]) * 40_000
