"""A batch over OpenAI-compatible servers (`pixtral-cpp serve` replicas, vLLM): the same JSONL, resumable.

    summary = run_remote_batch(["http://gpu1:8000/v1", "http://gpu2:8000/v1"], images, "answers.jsonl",
                               prompt="What is in this picture?", remote=RemoteOptions(api_key=KEY))

The output file, its records and its resume rules are the local batch's (pixtral_cpp.batch, one
writer for both): no image twice, none lost. Each endpoint runs `concurrency` workers that take images
from one shared queue; an image whose endpoint is dropped goes back to the queue for the others
(pixtral_cpp.remote_endpoint says when an endpoint is dropped). Only this thread writes records; a
worker's answer is on disk before the next one is reported.

Images are prepared here exactly as the local path prepares them (EXIF, alpha, the image budget, the
grid of 16) and sent as lossless PNG at that final size: the server finds pixels already at its grid
size and leaves them unchanged, so answers match the local batch's at temperature 0; the upload is at
most 1024 x 1024 px whatever the original (under pixtral-cpp serve's pixel and body limits); and an
unreadable image is recorded with the local batch's own error, without a request.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pixtral_cpp.batch import BatchProgress, BatchRecord, BatchSummary, PendingBatch, open_batch
from pixtral_cpp.defaults import DEFAULT_PROMPT
from pixtral_cpp.errors import EndpointError, ImageError, OptionsError
from pixtral_cpp.images import MAX_IMAGE_SIZE, check_max_image_size, prepare_image
from pixtral_cpp.options import GenerationOptions
from pixtral_cpp.remote_endpoint import (
    DEFAULT_TIMEOUT,
    Endpoint,
    EndpointDropped,
    ImageRefused,
    RemoteAnswer,
    default_concurrency,
)

logger = logging.getLogger(__name__)
POLL_SECONDS = 0.05  # how often an idle worker looks at the queue and the stop flag


@dataclass(frozen=True)
class RemoteOptions:
    """How to reach the servers and what to ask them for."""

    api_key: str | None = None  # sent to every endpoint as a Bearer token
    model: str | None = None  # the model id to ask for; None: the first one each server lists
    concurrency: int | None = None  # requests in flight per endpoint; None: 1 for pixtral-cpp, 8 for others
    timeout: float = DEFAULT_TIMEOUT  # seconds for one answer
    max_image_size: int = MAX_IMAGE_SIZE  # the local path's budget: images are prepared at it before sending

    def __post_init__(self) -> None:
        check_max_image_size(self.max_image_size)
        if self.concurrency is not None and self.concurrency < 1:
            raise OptionsError(f"concurrency must be at least 1, got {self.concurrency}")
        if not self.timeout > 0:
            raise OptionsError(f"timeout must be positive, got {self.timeout}")


@dataclass
class EndpointReport:
    """What one endpoint did in this run."""

    url: str
    model: str | None
    concurrency: int
    images: int = 0  # answered (an image it refused counts: the answer is the refusal)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # from the start until its last answer, or until it was dropped
    dropped: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second, from the servers' usage counts."""
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class RemoteBatchSummary(BatchSummary):
    endpoints: tuple[EndpointReport, ...] = ()


@dataclass
class _Run:
    """What the workers share with this thread."""

    work: queue.Queue[Path] = field(default_factory=queue.Queue)
    results: queue.Queue[tuple[str, Endpoint, object]] = field(default_factory=queue.Queue)
    stop: threading.Event = field(default_factory=threading.Event)


def run_remote_batch(servers: Sequence[str], images: Iterable[str | os.PathLike[str]],
                     out_path: str | os.PathLike[str], *, prompt: str = DEFAULT_PROMPT,
                     generation: GenerationOptions | None = None, remote: RemoteOptions | None = None,
                     on_progress: Callable[[BatchProgress], None] | None = None,
                     on_notice: Callable[[str], None] | None = None,
                     retry_failed: bool = False) -> RemoteBatchSummary:
    """Describe each image not yet in `out_path` for this prompt through `servers`, as run_batch does.

    `on_notice` hears of each endpoint dropped, as it happens. EndpointError when every endpoint was
    dropped, the images still to do left for a re-run; a KeyboardInterrupt (also from on_progress)
    propagates with every finished record on disk, requests in flight abandoned.
    """
    generation, remote = generation or GenerationOptions(), remote or RemoteOptions()
    notice = on_notice or (lambda _: None)
    if not servers:
        raise OptionsError("give at least one server URL")
    endpoints = [Endpoint(url, api_key=remote.api_key, timeout=remote.timeout, model=remote.model)
                 for url in dict.fromkeys(servers)]
    reports = {id(endpoint): EndpointReport(endpoint.url, None, 0) for endpoint in endpoints}
    run = _Run()
    started = time.monotonic()
    with open_batch(images, out_path, prompt, retry_failed, on_progress) as batch:
        try:
            if batch.pending:
                _start(endpoints, reports, batch, run, prompt, generation, remote, notice)
                _collect(batch, run, reports, started, notice)
        finally:
            run.stop.set()  # idle workers leave; one in a request leaves when it returns
            for endpoint in endpoints:
                endpoint.close()
    summary = batch.summary()
    return RemoteBatchSummary(summary.done, summary.skipped_already_done, summary.failed, summary.seconds,
                              summary.retried, tuple(reports.values()))


def _start(endpoints: list[Endpoint], reports: dict[int, EndpointReport], batch: PendingBatch, run: _Run,
           prompt: str, generation: GenerationOptions, remote: RemoteOptions, notice: Callable[[str], None]
           ) -> None:
    """Queue the pending images, probe every endpoint, start the workers of those that answered."""
    for path in batch.pending:
        run.work.put(path)
    for endpoint in endpoints:
        endpoint.open(remote.concurrency or 1)
        try:
            owner = endpoint.probe(run.stop)
        except EndpointDropped as dropped:
            reports[id(endpoint)].dropped = str(dropped)
            notice(f"{endpoint.url} dropped: {dropped}")
            continue
        concurrency = remote.concurrency or default_concurrency(owner)
        if concurrency != endpoint.concurrency:
            endpoint.close()
            endpoint.open(concurrency)
        report = reports[id(endpoint)]
        report.model, report.concurrency = endpoint.model, concurrency
        for number in range(concurrency):
            run.results.put(("started", endpoint, None))  # before the worker can say it left
            threading.Thread(target=_work, args=(endpoint, run, prompt, generation, remote.max_image_size),
                             name=f"remote-batch {endpoint.url} #{number}", daemon=True).start()
    if all(report.dropped for report in reports.values()):
        raise _all_dropped(reports.values(), batch)


def _collect(batch: PendingBatch, run: _Run, reports: dict[int, EndpointReport], started: float,
             notice: Callable[[str], None]) -> None:
    """Save each answer as it comes, until every pending image has a record or no worker is left."""
    workers = 0
    while batch.described + batch.failed < len(batch.pending):
        try:
            kind, endpoint, payload = run.results.get(timeout=0.5)  # a timeout keeps Ctrl-C responsive
        except queue.Empty:
            if run.work.unfinished_tasks == 0 and run.results.empty():  # every outcome put was read
                raise RuntimeError("remote batch: an image is neither queued nor answered (a bug)") from None
            continue
        report = reports[id(endpoint)]
        if kind == "started":
            workers += 1
        elif kind == "left":
            workers -= 1
            if endpoint.dropped and report.dropped is None:
                report.dropped, report.seconds = endpoint.dropped, time.monotonic() - started
                logger.warning("%s dropped: %s", endpoint.url, endpoint.dropped)
                notice(f"{endpoint.url} dropped: {endpoint.dropped}; its images go to the others")
            if workers == 0:
                raise _all_dropped(reports.values(), batch)
        elif kind == "crashed":
            raise payload  # type: ignore[misc]  # a bug in a worker: shown, not swallowed
        else:
            record, answer = payload  # type: ignore[misc]
            batch.save(record)
            report.images += 1
            report.seconds = time.monotonic() - started
            if answer is not None:
                report.prompt_tokens += answer.prompt_tokens
                report.completion_tokens += answer.completion_tokens


def _work(endpoint: Endpoint, run: _Run, prompt: str, generation: GenerationOptions, budget: int) -> None:
    """One worker: images from the queue to the endpoint until the batch stops or the endpoint is dropped."""
    try:
        while not run.stop.is_set() and endpoint.dropped is None:
            try:
                path = run.work.get(timeout=POLL_SECONDS)
            except queue.Empty:
                continue
            try:
                outcome = _describe_remote(endpoint, path, prompt, generation, budget, run.stop)
            except EndpointDropped:
                run.work.put(path)  # for the other endpoints: nothing lost
                run.work.task_done()  # each only once the image is back in the queue or its outcome sent
                break
            run.results.put(("answered", endpoint, outcome))
            run.work.task_done()
    except BaseException as error:  # noqa: BLE001 - carried to the main thread, which raises it
        if not run.stop.is_set():
            run.results.put(("crashed", endpoint, error))
    finally:
        run.results.put(("left", endpoint, None))


def _describe_remote(endpoint: Endpoint, path: Path, prompt: str, generation: GenerationOptions, budget: int,
                     stop: threading.Event) -> tuple[BatchRecord, RemoteAnswer | None]:
    try:
        png = prepared_png(path, budget)
        answer = endpoint.describe(png, prompt, generation, stop)
    except (ImageError, ImageRefused) as error:
        return BatchRecord(str(path), None, str(error), None, prompt), None
    stats = {"prompt_tokens": answer.prompt_tokens, "generated_tokens": answer.completion_tokens,
             "finish_reason": answer.finish_reason, "seconds": round(answer.seconds, 3),
             "attempts": answer.attempts, "server": endpoint.url, "model": answer.model}
    return BatchRecord(str(path), answer.text, None, stats, prompt), answer


def prepared_png(path: str | os.PathLike[str], max_image_size: int = MAX_IMAGE_SIZE) -> bytes:
    """The image as the local path would hand it to the vision encoder, as a PNG (lossless)."""
    from PIL import Image

    prepared = prepare_image(path, max_image_size=max_image_size)
    out = io.BytesIO()
    Image.fromarray(prepared.pixels).save(out, format="PNG")
    return out.getvalue()


def _all_dropped(reports: Iterable[EndpointReport], batch: PendingBatch) -> EndpointError:
    reasons = "; ".join(f"{report.url}: {report.dropped}" for report in reports)
    left = len(batch.pending) - batch.described - batch.failed
    return EndpointError(f"every server was dropped ({reasons}); {left} images are not done, the finished ones "
                         "are in the output file: run the same command again to resume")
