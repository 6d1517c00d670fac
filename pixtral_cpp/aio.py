"""asyncio bridging: items handed from a worker thread to the event loop, and model streams run that way.

`LoopChannel` holds the rules every such hand-over follows (PixtralModel.astream_* and the server's
generation worker both use it): the thread puts items, an error or the end; the loop awaits them; a
closed loop is not an error for the thread, which then cancels its work instead.

The thread that iterates a stream is the one that closes it: a generator cannot be closed from
another thread while it runs ("generator already executing"). So the event loop never touches the
stream; when the consumer stops early it cancels the stream's CancelToken, and the worker sees it at
the next check (image, prompt batch or token), ends the stream and so releases the model's lock.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from pixtral_cpp.control import CancelToken
from pixtral_cpp.results import Chunk

T = TypeVar("T")
StreamFactory = Callable[[CancelToken], Iterator[Chunk]]


class ChannelClosed(Exception):
    """The producer closed the channel: no item will come any more."""


@dataclass(frozen=True)
class _Failure:
    error: BaseException


_END = object()  # the producer is done with the channel


class LoopChannel(Generic[T]):
    """One producer thread to one consumer on `loop`: items in order, then an optional error, then the end.

    `on_loop_gone` runs in the producer's thread when the loop has closed (nobody is listening any
    more): typically it cancels the work that produces the items.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_loop_gone: Callable[[], None]) -> None:
        self._loop, self._on_loop_gone = loop, on_loop_gone
        # Items wait here, not in a pending get: a get that times out or is cancelled loses nothing.
        self._items: deque[object] = deque()
        self._arrived = asyncio.Event()
        self._closed = False  # the consumer has seen the end

    def put(self, item: T) -> None:
        """From the producer's thread: hand `item` to the loop."""
        self._send(item)

    def fail(self, error: BaseException) -> None:
        """From the producer's thread: the consumer's next get raises `error`."""
        self._send(_Failure(error))

    def close(self) -> None:
        """From the producer's thread: nothing more will come; gets raise ChannelClosed after the items."""
        self._send(_END)

    def _send(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._arrive, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._on_loop_gone()

    def _arrive(self, item: object) -> None:  # on the loop
        self._items.append(item)
        self._arrived.set()

    async def _next(self, timeout: float | None) -> object:
        if self._closed:
            return _END
        while not self._items:
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), timeout)
        item = self._items.popleft()
        self._closed = item is _END
        return item

    async def get(self, timeout: float | None = None) -> T:
        """The next item. Raises the error the producer failed with, ChannelClosed at the end, or
        asyncio.TimeoutError when nothing came within `timeout` seconds (the next get takes it)."""
        item = await self._next(timeout)
        if item is _END:
            raise ChannelClosed
        if isinstance(item, _Failure):
            raise item.error
        return item  # type: ignore[return-value]

    async def wait_closed(self) -> None:
        """Until the producer closes the channel, dropping what it still sends, errors included."""
        while await self._next(None) is not _END:
            pass


async def stream_in_thread(open_stream: StreamFactory, cancel: CancelToken | None = None
                           ) -> AsyncGenerator[Chunk, None]:
    """Chunks of `open_stream(token)`, run in a new thread; the event loop only awaits a channel.

    Stopping early (break, aclose, task cancellation) cancels the token and waits, without blocking
    the loop, until the worker has closed the stream, so the next call on the model starts at once.
    """
    token = CancelToken(parent=cancel)  # ours to cancel without touching the caller's token
    channel: LoopChannel[Chunk] = LoopChannel(asyncio.get_running_loop(), on_loop_gone=token.cancel)
    threading.Thread(target=_pump, args=(open_stream, token, channel), name="pixtral-cpp-stream",
                     daemon=True).start()
    try:
        while True:
            try:
                chunk = await channel.get()
            except ChannelClosed:
                return
            yield chunk
    finally:
        token.cancel()  # a no-op once the stream has ended
        await channel.wait_closed()  # the stream is closed and the model lock released


def _pump(open_stream: StreamFactory, token: CancelToken, channel: LoopChannel[Chunk]) -> None:
    """Worker thread: iterate and close the stream here, handing every chunk to the event loop."""
    try:
        stream = open_stream(token)
        try:
            for chunk in stream:  # ends soon after a cancel: the stream checks the token itself
                channel.put(chunk)
        finally:
            stream.close()  # type: ignore[attr-defined]
    except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer's task
        channel.fail(exc)
    finally:
        channel.close()
