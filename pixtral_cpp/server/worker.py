"""One thread that runs every generation of a shared model, in arrival order, for asyncio callers.

PixtralModel is synchronous and holds one KV cache, so requests take turns: jobs wait in a FIFO queue
and a single worker thread runs them one at a time, handing each job's chunks to its request through a
LoopChannel (pixtral_cpp.aio, whose rules this follows: the thread that iterates a model stream closes
it; the event loop only cancels the job's token, which the worker and the model check, so a client that
leaves stops generation and frees the model's lock for the next job).

Admission comes first: a request takes a Slot before its body is read or its images decoded, so the
queue limit also bounds the memory of requests still being prepared; the slot is given back when the
job ends or the request fails, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from pixtral_cpp.aio import ChannelClosed, LoopChannel
from pixtral_cpp.control import CancelToken
from pixtral_cpp.conversation import Message
from pixtral_cpp.errors import PixtralError, ServerBusyError, ServerShuttingDownError
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.results import Chunk, GenerationStats

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1  # how often a waiting request checks whether its client is still there


class Slot:
    """One place among the worker's `max_queued`, held from admission until the request's job ends."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """Give the place back (idempotent: the failure path and the job's end may both call it)."""
        release, self._release = self._release, None
        if release is not None:
            release()


class Job:
    """One generation: the worker puts its chunks into a channel; the request reads them with `chunks`."""

    def __init__(self, messages: list[Message], options: GenerationOptions, loop: asyncio.AbstractEventLoop,
                 slot: Slot) -> None:
        self.messages, self.options, self.slot = messages, options, slot
        # The model checks it between images, prompt batches and tokens: a client that leaves during a
        # long prefill frees the worker too, not only one that leaves during generation.
        self.token = CancelToken()
        # A closed loop means the server is gone: nobody reads this job any more, so it stops.
        self.channel: LoopChannel[Chunk] = LoopChannel(loop, on_loop_gone=self.cancel)

    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    def cancel(self) -> None:
        """Stop this job at the model's next check (or skip it if it has not started)."""
        self.token.cancel()

    async def chunks(self, disconnected: Callable[[], Awaitable[bool]]) -> AsyncGenerator[Chunk, None]:
        """Text chunks then GenerationStats; raises the job's error. Stops, and cancels the job, when
        `disconnected()` turns true or the caller stops iterating."""
        try:
            while not await disconnected():
                try:
                    item = await self.channel.get(timeout=POLL_SECONDS)
                except asyncio.TimeoutError:
                    continue  # nothing yet: check the client again
                except ChannelClosed:  # ended without stats: skipped or cut short, its error already raised
                    return
                yield item
                if isinstance(item, GenerationStats):
                    return
            logger.info("client went away; stopping its generation")
        finally:
            self.cancel()  # a no-op after the stats: the worker is done with this job


class GenerationWorker:
    """Runs jobs on `model` (a PixtralModel) one at a time, in the order they were submitted."""

    def __init__(self, model: Any, max_queued: int) -> None:
        self._model = model
        self._max_queued = max_queued
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0  # slots taken and not given back
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._current: Job | None = None  # the job the worker is running
        self._stopping = False
        self.completed = 0  # jobs that ran to their end
        self.cancelled = 0  # jobs stopped or skipped because their client left

    @property
    def pending(self) -> int:
        """Requests admitted and not finished: being read or prepared, waiting, or running."""
        return self._pending

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pixtral-generation", daemon=True)
            self._thread.start()

    def shut_down(self) -> None:
        """From any thread: refuse new requests, end the running job with ServerShuttingDownError at its
        next check, and refuse the waiting ones; the thread keeps running until `stop`."""
        self._stopping = True
        if (current := self._current) is not None:
            current.cancel()

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down and end the thread."""
        self.shut_down()
        if self._thread is None:
            return
        self._jobs.put(None)
        self._thread.join(timeout)
        self._thread = None

    def admit(self) -> Slot:
        """A place in line, or ServerBusyError; taken before the request is read, so a refusal is instant."""
        with self._pending_lock:
            if self._stopping:
                raise ServerShuttingDownError("the server is shutting down")
            if self._pending >= self._max_queued:
                raise ServerBusyError(f"{self._pending} requests are already waiting or running "
                                      f"(the limit is {self._max_queued}); retry shortly")
            self._pending += 1
        return Slot(self._release)

    def _release(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def submit(self, slot: Slot, messages: list[Message], options: GenerationOptions) -> Job:
        """Queue a generation in `slot` (the job releases it when it ends); read it with `Job.chunks` on
        the running event loop."""
        if self._stopping:
            raise ServerShuttingDownError("the server is shutting down")
        job = Job(messages, options, asyncio.get_running_loop(), slot)
        self.start()
        self._jobs.put(job)
        return job

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._current = job
            try:
                self._serve(job)
            finally:
                self._current = None
                job.channel.close()
                job.slot.release()
        while not self._jobs.empty():  # submitted after the end marker: refuse, and free their slots
            if (job := self._jobs.get_nowait()) is not None:
                job.channel.fail(ServerShuttingDownError("the server is shutting down"))
                job.channel.close()
                job.slot.release()

    def _serve(self, job: Job) -> None:
        if self._stopping:
            job.channel.fail(ServerShuttingDownError("the server is shutting down"))
            return
        if job.cancelled:  # its client left while it waited: never touch the model for it
            self.cancelled += 1
            return
        stream = self._model.stream_chat(job.messages, job.options, cancel=job.token)
        try:
            for chunk in stream:
                if job.cancelled:
                    self._end_cancelled(job)
                    return
                job.channel.put(chunk)
            self.completed += 1
        except Exception as error:  # every failure goes back to its request
            if not isinstance(error, PixtralError):  # ours say what to fix; anything else is a bug
                logger.exception("generation failed")
            job.channel.fail(error)
        finally:
            stream.close()  # here, in the thread iterating it: stops generation, releases the model lock

    def _end_cancelled(self, job: Job) -> None:
        if self._stopping:  # ended by the shutdown, not by its client: tell the client why
            job.channel.fail(ServerShuttingDownError("the server is shutting down; this answer was cut short"))
        else:
            self.cancelled += 1
