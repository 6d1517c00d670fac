"""Cancelling a generation from another thread, and progress reports from loading and prompting.

    cancel = CancelToken()
    threading.Timer(5.0, cancel.cancel).start()       # e.g. a Stop button
    model.describe("photo.jpg", cancel=cancel, on_progress=print)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

ProgressStage = Literal["load", "image", "prompt"]


@dataclass(frozen=True)
class ProgressEvent:
    """How far one stage of a call has come.

    load: fraction of the GGUF pair loaded (done 0.0..1.0, total 1.0); image: images of the prompt
    prepared and encoded (or found in the cache) so far; prompt: prompt positions evaluated so far.
    `done` never decreases within a stage of one call, and reaches `total` when the stage completes.
    """

    stage: ProgressStage
    done: float
    total: float

    @property
    def fraction(self) -> float:
        return min(self.done / self.total, 1.0) if self.total > 0 else 1.0


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Ask a running generation to stop, from any thread; it ends with finish_reason "cancelled".

    Checked before each image is prepared, between prompt batches and between generated tokens. A
    token stays cancelled: use a new one for the next call. `parent`: also cancelled when it is.
    """

    def __init__(self, parent: CancelToken | None = None) -> None:
        self._event = threading.Event()
        self._parent = parent

    def cancel(self) -> None:
        """Request the stop; returns at once (the generation stops at its next check)."""
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self._parent is not None and self._parent.cancelled)


class GenerationCancelled(Exception):
    """Internal: unwinds prompt preparation when its CancelToken fires (never reaches the caller)."""


@dataclass(frozen=True)
class CallControl:
    """A call's cancel token and progress callback, either of which may be absent."""

    cancel: CancelToken | None = None
    on_progress: ProgressCallback | None = None

    @property
    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled

    def check(self) -> None:
        """Raise GenerationCancelled if the call was cancelled."""
        if self.cancelled:
            raise GenerationCancelled

    def report(self, stage: ProgressStage, done: float, total: float) -> None:
        # An exception from the callback propagates on purpose: it aborts the call (the callers keep
        # the KV cache bookkeeping consistent before reporting).
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(stage, done, total))
