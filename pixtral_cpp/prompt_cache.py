"""What a model remembers between calls besides its KV cache (pixtral_cpp.kv_cache owns that).

Encoded images are kept by the content hash of their pixels, so a question about the same image does
not run the vision encoder again; image sources by a cheap fingerprint, so a follow-up about the same
file does not even decode it again; and recent answers with the tokens generated for them. Each table
is bounded and forgets its least recently used entry first.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping
from pathlib import Path
from typing import TypeVar

import numpy as np

from pixtral_cpp.backend import ImageEmbedding

ANSWERS_KEPT = 16  # recent answers whose generated tokens are remembered

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def source_fingerprint(source: object) -> str | None:
    """A cheap identity for an image source, so a follow-up skips decoding and resizing it again:
    a file by path, modification time and size; bytes and arrays by a hash of their content."""
    if isinstance(source, (str, os.PathLike)):
        try:
            path = Path(source).resolve()
            stat = path.stat()
        # ValueError: a NUL in the name; RuntimeError: Python < 3.13 on a symlink loop
        except (OSError, ValueError, RuntimeError):
            return None  # let preparation report the problem as an ImageError
        return f"path:{path}:{stat.st_mtime_ns}:{stat.st_size}"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes:" + hashlib.blake2b(source, digest_size=16).hexdigest()
    if isinstance(source, np.ndarray):
        digest = hashlib.blake2b(np.ascontiguousarray(source).tobytes(), digest_size=16).hexdigest()
        return f"array:{source.shape}:{source.dtype}:{digest}"
    return None  # PIL images and the like: prepared every time


def image_key(pixels: np.ndarray) -> str:
    """Content hash of the prepared pixels (the exact input of the encoder)."""
    digest = hashlib.blake2b(pixels.tobytes(), digest_size=16)
    digest.update(repr(pixels.shape).encode())
    return "img:" + digest.hexdigest()


class RecentTable(Mapping[K, V]):
    """At most `capacity` entries; a lookup or a put makes an entry the most recent, and a put beyond
    the capacity drops the least recent one."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[K, V] = OrderedDict()

    def __getitem__(self, key: K) -> V:
        value = self._entries[key]
        self._entries.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def __iter__(self) -> Iterator[K]:  # oldest first
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class PromptCache:
    """Recently encoded images, the image keys of recent sources, and recent answers."""

    def __init__(self, image_capacity: int) -> None:
        self._images: RecentTable[str, ImageEmbedding] = RecentTable(image_capacity)
        # (fingerprint, image budget) -> image key: small entries, so more of them than of images
        self._sources: RecentTable[tuple[str, int], str] = RecentTable(4 * max(image_capacity, 1))
        # Answer text -> the tokens generated for it: when a follow-up sends an answer back, its tokens
        # are reused as generated (re-tokenizing need not give them), so the KV cache already holds them.
        self.answers: RecentTable[str, tuple[int, ...]] = RecentTable(ANSWERS_KEPT)

    def embedding(self, key: str) -> ImageEmbedding | None:
        return self._images.get(key)

    def known_source(self, fingerprint: str | None, budget: int) -> tuple[str, ImageEmbedding] | None:
        """The key and embedding of a source seen before at this image budget, if still cached."""
        key = self._sources.get((fingerprint, budget)) if fingerprint else None
        embedding = self.embedding(key) if key else None
        return (key, embedding) if key and embedding is not None else None

    def remember_source(self, fingerprint: str | None, budget: int, key: str) -> None:
        if fingerprint:
            self._sources.put((fingerprint, budget), key)

    def remember(self, key: str, embedding: ImageEmbedding) -> None:
        self._images.put(key, embedding)

    def remember_answer(self, text: str, token_ids: tuple[int, ...]) -> None:
        self.answers.put(text, token_ids)
