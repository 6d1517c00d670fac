"""Evaluated prompt prefixes on disk, so that a new process answers about the same image in seconds.

An entry is llama.cpp's serialized KV state of one prompt prefix (bytes this module never interprets),
named by a digest of everything that determines it: the identity of the model pair and of the
settings that change evaluation (`identity_digest`), and the exact key of every position of the
prefix (token ids, image content hashes: kv_cache.Key). Its file name carries that digest and the
prefix length, so a lookup lists the folder once, hashes the prompt's keys once up to the longest
stored length, and opens only the longest entry that matches.

Contract: an entry is published whole (temp file in the folder, then os.replace) or not at all; it is
read whole and checked (size, magic, version, identity, key digest, length, CRC-32 of the payload)
before anything reaches llama.cpp; one that fails a check is logged, removed and treated as a miss.
Several processes may share a folder: nothing is locked, a reader tolerates an entry vanishing under
it, an evictor tolerates another one removing the same files. The folder is bounded in bytes, least
recently used first (a hit touches its entry's mtime). Storing never fails an answer: a full disk,
an unwritable folder or any other OSError skips it with one log line. Writes run in background
threads so the first token is not delayed; `flush` waits for them (the threads are not daemons, so
an interpreter does not exit before its entries are written either).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".pxkv"
PARTIAL = ".partial"
MAGIC = b"PXKVSTAT"
VERSION = 1
# magic, version, identity digest, key digest, positions, payload bytes, payload CRC-32, header CRC-32
_HEADER = struct.Struct("<8sI32s32sQQII")
IDENTITY_BYTES = 1 << 20  # a file's identity hashes its first MiB (GGUF header and metadata) ...
STALE_PARTIAL_SECONDS = 3600  # a temp file this old was left by a writer that died: removed on eviction

Key = int | str  # kv_cache.Key (a token id, an image's content hash), not imported: `pixtral-cpp cache` stays light


def file_identity(path: Path) -> str:
    """... beside its real path, size and modification time: a rewritten or touched file is another one."""
    real = Path(os.path.realpath(path))
    stat = real.stat()
    with real.open("rb") as f:
        head = hashlib.sha256(f.read(IDENTITY_BYTES)).hexdigest()
    return f"{real}\0{stat.st_size}\0{stat.st_mtime_ns}\0{head}"


def identity_digest(files: Iterable[Path], settings: Mapping[str, object]) -> bytes:
    """The digest of a model pair's files and the settings that change its evaluated state."""
    digest = hashlib.sha256(f"pixtral-cpp prompt cache {VERSION}\0".encode())
    for path in files:
        digest.update(file_identity(path).encode() + b"\1")
    for name in sorted(settings):
        digest.update(f"{name}={settings[name]!r}\1".encode())
    return digest.digest()


def prefix_digests(identity: bytes, keys: Sequence[Key], lengths: Iterable[int]) -> dict[int, bytes]:
    """The key digest of `keys[:n]` for each n in `lengths`, in one pass over the keys."""
    wanted = sorted({n for n in lengths if 0 < n <= len(keys)})
    digest, done, out = hashlib.sha256(identity), 0, {}
    for n in wanted:
        for key in keys[done:n]:
            # A token id and an image key cannot read alike: each is tagged and its length fixed.
            digest.update(b"t" + struct.pack("<i", key) if isinstance(key, int) else b"i" + _image_bytes(key))
        done = n
        out[n] = digest.copy().digest()
    return out


def _image_bytes(key: str) -> bytes:
    raw = key.encode()
    return struct.pack("<H", len(raw)) + raw


def entry_name(identity: bytes, length: int, key_digest: bytes) -> str:
    return f"{identity.hex()[:16]}-{length}-{key_digest.hex()[:32]}{SUFFIX}"


@dataclass(frozen=True)
class EntryInfo:
    """One entry as `pixtral-cpp cache` lists it."""

    path: Path
    positions: int
    size: int
    last_used: float  # mtime: written or last restored


@dataclass(frozen=True)
class Hit:
    """A stored prefix that a prompt starts with, read and checked."""

    positions: int
    state: bytearray
    seconds: float  # reading and checking it


class DiskCache:
    """The prompt cache folder of one model pair and settings (`identity`)."""

    def __init__(self, folder: Path, identity: bytes, max_bytes: int) -> None:
        self.folder, self.identity, self.max_bytes = Path(folder), identity, max_bytes
        self._writers: list[threading.Thread] = []
        self._lock = threading.Lock()

    # -- reading ---------------------------------------------------------------------------------------

    def longest_prefix(self, keys: Sequence[Key], usable: Callable[[int], bool], longer_than: int = 0
                       ) -> Hit | None:
        """The longest valid entry whose keys begin `keys`, among lengths above `longer_than` that
        `usable` accepts; bad entries met on the way are removed."""
        started = time.monotonic()
        stored = self._stored_lengths()
        lengths = [n for n in stored if longer_than < n <= len(keys) and usable(n)]
        for n, key_digest in sorted(prefix_digests(self.identity, keys, lengths).items(), reverse=True):
            name = entry_name(self.identity, n, key_digest)
            if name not in stored[n]:
                continue
            state = self._read(self.folder / name, key_digest, n)
            if state is not None:
                return Hit(n, state, time.monotonic() - started)
        return None

    def has(self, keys: Sequence[Key]) -> bool:
        """Whether the prefix `keys` is stored (its entry is touched: it is wanted again)."""
        digest = prefix_digests(self.identity, keys, [len(keys)])[len(keys)]
        path = self.folder / entry_name(self.identity, len(keys), digest)
        return _touch(path)

    def _stored_lengths(self) -> dict[int, set[str]]:
        """Entry names of this identity in the folder, by prefix length."""
        prefix = self.identity.hex()[:16] + "-"
        found: dict[int, set[str]] = {}
        try:
            names = os.listdir(self.folder)
        except OSError:
            return found  # no folder yet, or not readable: nothing stored
        for name in names:
            if name.startswith(prefix) and name.endswith(SUFFIX):
                length = name[len(prefix):].split("-", 1)[0]
                if length.isdigit():
                    found.setdefault(int(length), set()).add(name)
        return found

    def _read(self, path: Path, key_digest: bytes, positions: int) -> bytearray | None:
        try:
            with path.open("rb") as f:
                problem, state = _read_entry(f, self.identity, key_digest, positions)
                inode = os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            return None  # evicted or replaced by another process meanwhile
        except OSError as exc:
            log.warning("prompt cache: cannot read %s: %s", path.name, exc)
            return None
        if problem is not None:
            log.warning("prompt cache: ignored and removed %s: %s", path.name, problem)
            _remove_if_same(path, inode)
            return None
        _touch(path)
        return state

    # -- writing ---------------------------------------------------------------------------------------

    def store(self, keys: Sequence[Key], state: bytearray) -> None:
        """Write the entry of prefix `keys` in a background thread (skipped, logged, on any OSError)."""
        worker = threading.Thread(target=self._write, args=(tuple(keys), state), name="pixtral-cpp cache writer")
        with self._lock:
            self._writers = [w for w in self._writers if w.is_alive()]
            self._writers.append(worker)
        worker.start()

    def flush(self) -> None:
        """Wait until every entry stored so far is written (or skipped)."""
        with self._lock:
            writers, self._writers = self._writers, []
        for worker in writers:
            worker.join()

    def _write(self, keys: tuple[Key, ...], state: bytearray) -> None:
        key_digest = prefix_digests(self.identity, keys, [len(keys)])[len(keys)]
        target = self.folder / entry_name(self.identity, len(keys), key_digest)
        size = _HEADER.size + len(state)
        if size > self.max_bytes:
            log.info("prompt cache: not storing %d positions: %d bytes exceed the cache's limit of %d",
                     len(keys), size, self.max_bytes)
            return
        partial = self.folder / f".{target.name}.{os.getpid()}.{threading.get_ident()}{PARTIAL}"
        started = time.monotonic()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free
            if free < size:
                raise OSError(28, f"{free} bytes free, the entry needs {size}")
            evict(self.folder, self.max_bytes - size)
            with open_partial(partial) as f:
                f.write(_header(self.identity, key_digest, len(keys), state))
                f.write(state)
            os.replace(partial, target)
            evict(self.folder, self.max_bytes)  # writers publishing at once each made room for one entry only
            log.debug("prompt cache: wrote %d positions, %d bytes, in %.3f s", len(keys), size,
                      time.monotonic() - started)
        except OSError as exc:
            log.warning("prompt cache: not storing %d positions in %s: %s", len(keys), self.folder, exc)
            _unlink(partial)


def open_partial(path: Path):  # noqa: ANN201 - a binary file; tests swap it for /dev/full (a real ENOSPC)
    """The temp file an entry is written to before it is published."""
    return path.open("xb")


def _header(identity: bytes, key_digest: bytes, positions: int, state: bytearray) -> bytes:
    fields = (MAGIC, VERSION, identity, key_digest, positions, len(state), zlib.crc32(state))
    head = _HEADER.pack(*fields, 0)
    return _HEADER.pack(*fields, zlib.crc32(head[:-4]))


def _read_entry(f, identity: bytes, key_digest: bytes, positions: int) -> tuple[str | None, bytearray]:  # noqa: ANN001
    """(what is wrong with the entry or None, its payload)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size:
        return f"truncated header ({len(head)} bytes)", bytearray()
    magic, version, ident, digest, n, length, crc, head_crc = _HEADER.unpack(head)
    if magic != MAGIC or zlib.crc32(head[:-4]) != head_crc:
        return "not a pixtral-cpp prompt cache entry (or a corrupted header)", bytearray()
    if version != VERSION:
        return f"format version {version}, this pixtral-cpp writes {VERSION}", bytearray()
    if ident != identity or digest != key_digest or n != positions:
        return "it belongs to another model, settings or prompt than its name says", bytearray()
    size = os.fstat(f.fileno()).st_size
    if size != _HEADER.size + length:
        return f"{size} bytes, its header says {_HEADER.size + length}", bytearray()
    state = bytearray(length)
    if f.readinto(state) != length:
        return "truncated while reading", bytearray()
    if zlib.crc32(state) != crc:
        return "checksum mismatch (corrupted)", bytearray()
    return None, state


# -- the folder as a whole (eviction, `pixtral-cpp cache`) -----------------------------------------------

def entries(folder: Path) -> list[EntryInfo]:
    """Every entry in `folder` (any model), least recently used first."""
    found = []
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith("."):
            continue
        try:
            stat = (Path(folder) / name).stat()
        except OSError:
            continue  # removed meanwhile
        parts = name[: -len(SUFFIX)].split("-")
        positions = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else 0
        found.append(EntryInfo(Path(folder) / name, positions, stat.st_size, stat.st_mtime))
    return sorted(found, key=lambda e: e.last_used)


def evict(folder: Path, budget: int) -> int:
    """Remove the least recently used entries until the rest take at most `budget` bytes; bytes freed.

    Also removes temp files left by writers that died. Another process may remove the same files
    meanwhile: a file already gone counts as freed by it.
    """
    _remove_stale_partials(folder)
    listed = entries(folder)
    total, freed = sum(e.size for e in listed), 0
    for entry in listed:
        if total - freed <= budget:
            break
        _unlink(entry.path)
        freed += entry.size
    return freed


def clear(folder: Path) -> int:
    """Remove every entry (and temp file) in `folder`; bytes freed."""
    freed = 0
    for entry in entries(folder):
        _unlink(entry.path)
        freed += entry.size
    _remove_stale_partials(folder, older_than=0.0)
    return freed


def _remove_stale_partials(folder: Path, older_than: float = STALE_PARTIAL_SECONDS) -> None:
    try:
        names = [n for n in os.listdir(folder) if n.endswith(PARTIAL)]
    except OSError:
        return
    now = time.time()
    for name in names:
        path = Path(folder) / name
        try:
            if now - path.stat().st_mtime >= older_than:
                path.unlink()
        except OSError:
            pass  # gone already, or its writer's process is finishing it


def _touch(path: Path) -> bool:
    try:
        os.utime(path)
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return path.is_file()  # a read-only folder: still there, just not touched


def _remove_if_same(path: Path, inode: int) -> None:
    """Remove `path` unless another process has meanwhile replaced it with a new entry."""
    try:
        if os.stat(path).st_ino == inode:
            path.unlink()
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
