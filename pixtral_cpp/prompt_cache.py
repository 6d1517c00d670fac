"""What the KV cache holds, position by position, so a follow-up turn evaluates only what changed.

Every position is keyed: a token by its id, an image position by the image's content hash. The
common prefix of the cached keys and a new prompt's keys is kept in the KV cache; encoded images
are kept by hash so a question about the same image does not run the vision encoder again.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixtral_cpp.backend import ImageEmbedding

Key = int | str

ANSWERS_KEPT = 16  # recent answers whose generated tokens are remembered


@dataclass(frozen=True)
class TokenRun:
    tokens: tuple[int, ...]

    def keys(self) -> list[Key]:
        return list(self.tokens)


@dataclass(frozen=True)
class ImageRun:
    key: str
    embedding: ImageEmbedding

    def keys(self) -> list[Key]:
        return [self.key] * self.embedding.n_positions


Run = TokenRun | ImageRun


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


def _put_recent(table: OrderedDict, key: object, value: object, capacity: int) -> None:
    """Insert or refresh `key` as the most recent entry; drop the least recent beyond `capacity`."""
    table[key] = value
    table.move_to_end(key)
    while len(table) > capacity:
        table.popitem(last=False)


class PromptCache:
    """The keys of the positions in the KV cache, recently encoded images, and recent answers."""

    def __init__(self, image_capacity: int) -> None:
        self.keys: list[Key] = []
        self._images: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._sources: OrderedDict[tuple[str, int], str] = OrderedDict()  # (fingerprint, budget) -> image key
        # Answer text -> the tokens generated for it: when a follow-up sends an answer back, its tokens
        # are reused as generated (re-tokenizing need not give them), so the KV cache already holds them.
        self.answers: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._capacity = image_capacity

    def embedding(self, key: str) -> ImageEmbedding | None:
        found = self._images.get(key)
        if found is not None:
            self._images.move_to_end(key)
        return found

    def known_source(self, fingerprint: str | None, budget: int) -> tuple[str, ImageEmbedding] | None:
        """The key and embedding of a source seen before at this image budget, if still cached."""
        key = self._sources.get((fingerprint, budget)) if fingerprint else None
        embedding = self.embedding(key) if key else None
        return (key, embedding) if key and embedding is not None else None

    def remember_source(self, fingerprint: str | None, budget: int, key: str) -> None:
        if fingerprint:
            _put_recent(self._sources, (fingerprint, budget), key, 4 * max(self._capacity, 1))

    def remember(self, key: str, embedding: ImageEmbedding) -> None:
        _put_recent(self._images, key, embedding, self._capacity)

    def remember_answer(self, text: str, token_ids: tuple[int, ...]) -> None:
        _put_recent(self.answers, text, token_ids, ANSWERS_KEPT)

    def reusable_prefix(self, runs: list[Run]) -> int:
        """Positions of `runs` already in the KV cache that can stay.

        At least the last position is always re-evaluated (its logits start the answer), and a
        prefix never ends inside an image: its rows are decoded together.
        """
        new_keys = [k for run in runs for k in run.keys()]
        limit = min(len(self.keys), len(new_keys) - 1)
        n = 0
        while n < limit and self.keys[n] == new_keys[n]:
            n += 1
        start = 0
        for run in runs:
            end = start + len(run.keys())
            if isinstance(run, ImageRun) and start < n < end:
                return start
            start = end
        return n

    def forget(self) -> None:
        """After an error the KV cache content is unknown: reuse nothing."""
        self.keys = []
