"""asyncio streaming: a synchronous model stream run in a worker thread, fed to the event loop.

The thread that iterates a stream is the one that closes it: a generator cannot be closed from
another thread while it runs ("generator already executing"). So the event loop never touches the
stream; when the consumer stops early it cancels the stream's CancelToken, and the worker sees it at
the next check (image, prompt batch or token), ends the stream and so releases the model's lock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass

from pixtral_cpp.control import CancelToken
from pixtral_cpp.results import Chunk

StreamFactory = Callable[[CancelToken], Iterator[Chunk]]


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()  # the worker is done: its stream is closed and the model lock released


async def stream_in_thread(open_stream: StreamFactory, cancel: CancelToken | None = None
                           ) -> AsyncGenerator[Chunk, None]:
    """Chunks of `open_stream(token)`, run in a new thread; the event loop only awaits a queue.

    Stopping early (break, aclose, task cancellation) cancels the token and waits, without blocking
    the loop, until the worker has closed the stream, so the next call on the model starts at once.
    """
    loop = asyncio.get_running_loop()
    token = CancelToken(parent=cancel)  # ours to cancel without touching the caller's token
    items: asyncio.Queue[object] = asyncio.Queue()  # unbounded: text chunks are small
    worker = threading.Thread(target=_pump, args=(open_stream, token, loop, items),
                              name="pixtral-cpp-stream", daemon=True)
    worker.start()
    finished = False
    try:
        while True:
            item = await items.get()
            if item is _END:
                finished = True
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        token.cancel()  # a no-op once the stream has ended
        while not finished:
            finished = await items.get() is _END


def _pump(open_stream: StreamFactory, token: CancelToken, loop: asyncio.AbstractEventLoop,
          items: asyncio.Queue[object]) -> None:
    """Worker thread: iterate and close the stream here, handing every item to the event loop."""

    def deliver(item: object) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            token.cancel()

    try:
        stream = open_stream(token)
        try:
            for chunk in stream:  # ends soon after a cancel: the stream checks the token itself
                deliver(chunk)
        finally:
            stream.close()  # type: ignore[attr-defined]
    except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's task
        deliver(_Failure(exc))
    finally:
        deliver(_END)
