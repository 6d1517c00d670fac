"""The KV cache of a text model, position by position: the one writer of it and of its keys.

Every position is keyed: a token by its id, an image position by the image's content hash. A
follow-up turn keeps the common prefix of the cached keys and its own keys and evaluates only the
rest. The keys are true only while every change to llama.cpp's KV cache goes through `KVCache`, and
a change that fails leaves the KV cache unknown: it is then emptied, keys and all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from pixtral_cpp.backend import ImageEmbedding, TextModel
from pixtral_cpp.errors import BackendError

Key = int | str
T = TypeVar("T")


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


@dataclass(frozen=True)
class ImageSpan:
    """An image's place in a prompt, known from its size before it is encoded: its key over its positions.

    Stands in for an ImageRun whose positions the KV cache already holds (kept or restored), so the
    image need not be encoded at all.
    """

    key: str
    n_positions: int

    def keys(self) -> list[Key]:
        return [self.key] * self.n_positions


Run = TokenRun | ImageRun | ImageSpan


def reusable_prefix(cached: Sequence[Key], runs: Sequence[Run]) -> int:
    """Positions of `runs` that a KV cache holding `cached` already has and can keep.

    At least the last position is always evaluated again (its logits start the answer), and a
    prefix never ends inside an image: an image is only reused whole.
    """
    new_keys = [k for run in runs for k in run.keys()]
    limit = min(len(cached), len(new_keys) - 1)
    n = 0
    while n < limit and cached[n] == new_keys[n]:
        n += 1
    start = 0
    for run in runs:
        end = start + len(run.keys())
        if isinstance(run, (ImageRun, ImageSpan)) and start < n < end:
            return start
        start = end
    return n


class KVCache:
    """Sequence 0 of `text`'s KV cache and the key of each position it holds."""

    def __init__(self, text: TextModel) -> None:
        self._text = text
        self._keys: list[Key] = []

    @property
    def keys(self) -> tuple[Key, ...]:
        """The key of every position in the KV cache, in order."""
        return tuple(self._keys)

    def reusable_prefix(self, runs: Sequence[Run]) -> int:
        """Positions of the prompt `runs` that can stay (see the module function)."""
        return reusable_prefix(self._keys, runs)

    def trim(self, n_keep: int) -> None:
        """Keep the first `n_keep` positions, drop the rest."""
        if not 0 <= n_keep <= len(self._keys):
            raise ValueError(f"cannot keep {n_keep} of the {len(self._keys)} positions in the KV cache")
        self._change(lambda: self._text.trim(n_keep), n_keep)

    def append_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate `tokens` after the cached positions; the logits of the last one, (n_vocab,)."""
        return self._change(lambda: self._text.eval_tokens(tokens), len(self._keys), tokens)

    def append_embeddings(self, key: str, rows: np.ndarray) -> None:
        """Evaluate image embedding rows (n, n_embd) after the cached positions, each keyed `key`."""
        self._change(lambda: self._text.decode_embeddings(rows), len(self._keys), [key] * len(rows))

    def snapshot(self) -> tuple[tuple[Key, ...], bytearray]:
        """The keys and llama.cpp's serialized state of what the KV cache holds now (a copy)."""
        return self.keys, self._text.sequence_state()

    def restore(self, keys: Sequence[Key], state: bytearray) -> None:
        """Replace the KV cache with a snapshot's `state`, whose positions `keys` name.

        A state that llama.cpp refuses, or that holds another number of positions, leaves it empty.
        """
        self._keys = []
        try:
            held = self._text.restore_sequence_state(state)
        except BaseException:
            self.forget()
            raise
        if held != len(keys):
            self.forget()
            raise BackendError(f"a saved KV cache state holds {held} positions, its keys {len(keys)}")
        self._keys = list(keys)

    def forget(self) -> None:
        """Empty the KV cache and its keys: reuse nothing."""
        self._keys = []
        if not self._text.closed:  # a closed model holds no KV cache (and clear() would refuse)
            self._text.clear()

    def _change(self, change: Callable[[], T], keep: int, added: Sequence[Key] = ()) -> T:
        """Apply one change to llama.cpp's KV cache; then it holds the first `keep` positions and `added`."""
        try:
            result = change()
        except BaseException:
            self.forget()  # a failed or interrupted decode leaves the KV cache unknown
            raise
        del self._keys[keep:]
        self._keys.extend(added)
        return result
