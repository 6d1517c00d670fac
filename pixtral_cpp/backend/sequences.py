"""Several sequences of one TextModel decoded together: each step appends a piece to each of them.

A step is what continuous batching runs (docs/parallel.md): the next token of every generating
sequence and a chunk of a prefilling one, each at its own sequence's next positions, for the price of
about one pass over the weights. A llama_batch holds token ids or embedding rows, never both, so the
token pieces share batches and the embedding pieces (an image's rows) others: a step with an image
chunk costs one llama_decode more. A step of more rows than n_batch is cut into several batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pixtral_cpp.backend.text import TextModel
from pixtral_cpp.errors import BackendError, ModelError


@dataclass(frozen=True, eq=False)
class Piece:
    """Positions to append to sequence `seq`: token ids (n,) or embedding rows (n, n_embd), one of them."""

    seq: int
    tokens: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    logits: bool = True  # wanted: the logits of the piece's last position

    @classmethod
    def of_tokens(cls, seq: int, tokens: Sequence[int] | np.ndarray, *, logits: bool = True) -> Piece:
        return cls(seq, tokens=np.ascontiguousarray(tokens, dtype=np.int32), logits=logits)

    @classmethod
    def of_embeddings(cls, seq: int, rows: np.ndarray, *, logits: bool = False) -> Piece:
        return cls(seq, embeddings=np.ascontiguousarray(rows, dtype=np.float32), logits=logits)

    def __len__(self) -> int:
        data = self.tokens if self.tokens is not None else self.embeddings
        return 0 if data is None else int(data.shape[0])


def decode_step(text: TextModel, pieces: Sequence[Piece]) -> dict[int, np.ndarray]:
    """Append each piece to its sequence; the logits (n_vocab,) of each piece that asks, by sequence.

    Every piece is checked before anything is decoded (a refusal changes nothing). A failure after
    that (llama.cpp refusing a batch, NaN logits, an interrupt between batches) trims every sequence
    of the step back to what it held before, and re-raises; the other sequences are never touched.
    """
    starts = _check(text, pieces)
    try:
        logits: dict[int, np.ndarray] = {}
        for group in ([p for p in pieces if p.tokens is not None], [p for p in pieces if p.tokens is None]):
            if group:
                logits.update(_decode_group(text, group, starts))
        return logits
    except BaseException:
        for piece in pieces:
            _roll_back(text, piece.seq, starts[piece.seq])
        raise


def _check(text: TextModel, pieces: Sequence[Piece]) -> dict[int, int]:
    """Each piece's sequence and rows, checked as llama.cpp would only by aborting; where each sequence starts."""
    if not pieces:
        raise ValueError("a step needs at least one piece")
    starts: dict[int, int] = {}
    for piece in pieces:
        if piece.seq in starts:
            raise ValueError(f"sequence {piece.seq} has two pieces in one step")
        starts[piece.seq] = start = text.positions(piece.seq)  # checks the sequence id
        if (piece.tokens is None) == (piece.embeddings is None):
            raise ValueError(f"the piece of sequence {piece.seq} needs token ids or embedding rows, not both")
        if piece.tokens is not None:
            _check_tokens(text, piece)
        else:
            _check_embeddings(text, piece)
        if start + len(piece) > text.n_ctx:
            raise BackendError(f"sequence {piece.seq}: {start} + {len(piece)} positions exceed the context of "
                               f"{text.n_ctx} per sequence; raise n_ctx")
    return starts


def _check_tokens(text: TextModel, piece: Piece) -> None:
    ids = piece.tokens
    assert ids is not None
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"the piece of sequence {piece.seq} needs a non-empty sequence of token ids")
    if ids.min() < 0 or ids.max() >= text.n_vocab:
        raise ModelError(f"token ids must be in [0, {text.n_vocab}), got {ids.min()}..{ids.max()}")


def _check_embeddings(text: TextModel, piece: Piece) -> None:
    rows = piece.embeddings
    assert rows is not None
    if rows.ndim != 2 or rows.shape[1] != text.n_embd or rows.shape[0] == 0:
        raise ModelError(f"embeddings of shape {rows.shape} do not fit a model with n_embd {text.n_embd}")
    # With one pool of cells, a NaN key is not masked away for the other sequences' attention without
    # flash attention (NaN + -inf is NaN): one bad image would spoil every answer in the context.
    if not np.isfinite(rows).all():
        raise ModelError(f"the embeddings of sequence {piece.seq} hold NaN or infinite values")


def _decode_group(text: TextModel, group: list[Piece], starts: dict[int, int]) -> dict[int, np.ndarray]:
    """Pieces of one kind, their rows laid end to end and decoded n_batch rows at a time."""
    _, ctx = text._handles()
    pos = np.concatenate([np.arange(starts[p.seq], starts[p.seq] + len(p), dtype=np.int32) for p in group])
    seqs = np.concatenate([np.full(len(p), p.seq, dtype=np.int32) for p in group])
    flags = np.concatenate([_last_flag(len(p), p.logits) for p in group])
    tokens = np.concatenate([p.tokens for p in group]) if group[0].tokens is not None else None
    rows = np.concatenate([p.embeddings for p in group]) if tokens is None else None  # type: ignore[misc]
    logits: dict[int, np.ndarray] = {}
    step = text.options.n_batch
    for off in range(0, len(flags), step):
        part = slice(off, off + step)
        text._decode_rows(ctx, tokens[part] if tokens is not None else None,
                          rows[part] if rows is not None else None, pos[part], seqs[part], flags[part])
        for row in np.flatnonzero(flags[part]):  # copied now: the next decode overwrites them
            logits[int(seqs[off + row])] = text._copy_logits(ctx, 1, int(row))[0]
    return logits


def _last_flag(n: int, wanted: bool) -> np.ndarray:
    flags = np.zeros(n, dtype=np.int8)
    flags[-1] = wanted
    return flags


def _roll_back(text: TextModel, seq: int, start: int) -> None:
    """Sequence `seq` as it was before a failed step: its first `start` positions."""
    if text.closed:
        return
    try:
        text.trim(start, seq)
    except BackendError:
        text.clear(seq)
