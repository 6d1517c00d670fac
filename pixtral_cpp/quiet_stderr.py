"""Capture what C libraries print to file descriptor 2, so that it reaches a log or an error message.

Some C code we call reports problems with fprintf(stderr) instead of a callback: libtiff's default
warning and error handlers (odd tags, damaged strips), llama.cpp's grammar parser. Python's sys.stderr
cannot intercept that, so `capture_stderr` points descriptor 2 at a temporary file for the duration of a
block and hands back what was written. Descriptor 2 is shared by the whole process, so captures are
serialised by one lock (re-entrant: a capture nested in another one in the same thread works), and
whatever another thread writes to stderr meanwhile lands in the capture too: keep the blocks short.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

MAX_CAPTURED_BYTES = 64 * 1024  # a C library looping on a warning must not fill memory or the message

_STDERR_LOCK = threading.RLock()


@contextmanager
def capture_stderr() -> Iterator[list[str]]:
    """Collect what is written to file descriptor 2 inside the block; the list is filled when it ends.

    The list holds one string (decoded as UTF-8, undecodable bytes replaced, cut to MAX_CAPTURED_BYTES)
    or nothing when the block wrote nothing but whitespace. When descriptor 2 is not open (a daemon with
    stderr closed) there is nothing to capture and the block runs as is.
    """
    captured: list[str] = []
    with _STDERR_LOCK:
        _flush_python_stderr()
        saved = _duplicate_stderr()
        if saved is None:  # no descriptor 2: C writes to it fail silently anyway
            yield captured
            return
        try:
            with tempfile.TemporaryFile() as sink:
                os.dup2(sink.fileno(), 2)
                try:
                    yield captured
                finally:
                    _flush_python_stderr()  # Python text written meanwhile belongs to the capture too
                    os.dup2(saved, 2)
                    sink.seek(0)
                    text = sink.read(MAX_CAPTURED_BYTES).decode("utf-8", errors="replace")
                    if text.strip():
                        captured.append(text)
        finally:
            os.close(saved)


def _duplicate_stderr() -> int | None:
    try:
        return os.dup(2)
    except OSError:
        return None


def _flush_python_stderr() -> None:
    stream = sys.stderr
    if stream is not None:
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken stream: nothing buffered worth keeping
            pass
