"""Embedding the API in apps: cancellation, progress callbacks, asyncio streams, threads, README example."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from pixtral_cpp.control import CancelToken, ProgressEvent
from pixtral_cpp.model import ModelBusyError, PixtralModel
from pixtral_cpp.options import ModelOptions
from pixtral_cpp.results import Completion, GenerationStats, TextChunk

OPTIONS = ModelOptions(n_ctx=4096, threads=2)
LONG = 3000  # tokens: far more than the tests let a generation run
README = Path(__file__).resolve().parent.parent / "README.md"


class CallbackFailed(Exception):
    pass


@pytest.fixture(scope="module")
def pixtral(pair):
    with PixtralModel.load(pair[0], options=OPTIONS) as model:
        yield model


def picture(seed: int, width: int = 320, height: int = 240) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def greedy(model: PixtralModel, seed: int, **fields) -> Completion:
    return model.describe(picture(seed), "Describe.", max_tokens=12, temperature=0, **fields)


def assert_monotonic(events: list[ProgressEvent], stage: str) -> list[ProgressEvent]:
    """The stage's events never go back, and the last one is complete."""
    mine = [e for e in events if e.stage == stage]
    assert mine, f"no {stage} progress"
    assert [e.done for e in mine] == sorted(e.done for e in mine), mine
    assert mine[-1].done == mine[-1].total and len({e.total for e in mine}) == 1, mine
    return mine


# -- cancellation -----------------------------------------------------------------------------------------


def test_cancel_from_another_thread_stops_and_leaves_the_model_usable(pixtral):
    expected = greedy(pixtral, 1).text
    cancel, texts = CancelToken(), []
    started = time.monotonic()
    stream = pixtral.stream_describe(picture(1), "Describe.", max_tokens=LONG, temperature=0, cancel=cancel)
    for chunk in stream:
        if isinstance(chunk, TextChunk):
            texts.append(chunk.text)
            if len(texts) == 3:
                threading.Timer(0.01, cancel.cancel).start()  # the Stop button, from another thread
    assert isinstance(chunk, GenerationStats)
    assert chunk.finish_reason == "cancelled"
    assert 3 <= chunk.generated_tokens < 200 and time.monotonic() - started < 10
    assert greedy(pixtral, 1).text == expected  # same answer as before: the KV cache bookkeeping held


def test_cancelled_describe_returns_the_text_so_far(pixtral):
    cancel = CancelToken()

    def stop_soon_after_the_prompt(event: ProgressEvent) -> None:
        if event.stage == "prompt" and event.done == event.total:
            threading.Timer(0.3, cancel.cancel).start()

    result = pixtral.describe(picture(2), "Describe.", max_tokens=LONG, temperature=0, cancel=cancel,
                              on_progress=stop_soon_after_the_prompt)
    assert result.stats.finish_reason == "cancelled"
    assert 0 < result.stats.generated_tokens < LONG and result.text


def test_cancel_before_the_second_image_is_encoded(pixtral):
    cancel = CancelToken()

    def stop_after_first_image(event: ProgressEvent) -> None:
        if event.stage == "image" and event.done == 1:
            cancel.cancel()

    before = pixtral.images_encoded
    result = pixtral.describe([picture(3), picture(4)], "Compare.", max_tokens=LONG, cancel=cancel,
                              on_progress=stop_after_first_image)
    assert result.stats.finish_reason == "cancelled"
    assert result.stats.images_encoded == 1 and pixtral.images_encoded == before + 1
    assert result.stats.generated_tokens == 0 and result.text == ""
    again = pixtral.describe([picture(3), picture(4)], "Compare.", max_tokens=4)
    assert again.stats.images_encoded == 1  # the first image was kept; only the second is new
    assert again.stats.finish_reason in ("stop", "length")


def test_a_token_cancelled_beforehand_evaluates_nothing(pixtral):
    cancel = CancelToken()
    cancel.cancel()
    result = pixtral.describe(picture(5), "Describe.", cancel=cancel)
    assert result.stats.finish_reason == "cancelled" and result.stats.images_encoded == 0


# -- progress ---------------------------------------------------------------------------------------------


def test_progress_is_reported_for_load_images_and_prompt(pair):
    events: list[ProgressEvent] = []
    with PixtralModel.load(pair[0], options=OPTIONS, on_progress=events.append) as model:
        load = assert_monotonic(events, "load")
        assert load[-1].done == 1.0 and len(load) > 2
        events.clear()
        model.describe([picture(6), picture(7)], "Compare.", max_tokens=2, on_progress=events.append)
    images = assert_monotonic(events, "image")
    assert [e.done for e in images] == [0, 1, 2] and images[0].total == 2
    prompt = assert_monotonic(events, "prompt")
    assert prompt[-1].total > 2 * 300  # both images' positions, in several batches
    stages = [e.stage for e in events]
    assert stages.index("prompt") > len(stages) - 1 - stages[::-1].index("image")  # images, then the prompt


@pytest.mark.parametrize("stage", ["image", "prompt"])
def test_a_failing_callback_aborts_the_call_and_the_model_stays_usable(pixtral, stage):
    expected = greedy(pixtral, 8).text

    def fail(event: ProgressEvent) -> None:
        if event.stage == stage and event.done > 0:
            raise CallbackFailed(stage)

    with pytest.raises(CallbackFailed):
        pixtral.describe(picture(8), "Describe.", max_tokens=12, temperature=0, on_progress=fail)
    assert greedy(pixtral, 8).text == expected


def test_a_failing_load_callback_aborts_the_load(pair):
    def fail(event: ProgressEvent) -> None:
        if event.done > 0.5:
            raise CallbackFailed("load")

    with pytest.raises(CallbackFailed):
        PixtralModel.load(pair[0], options=OPTIONS, on_progress=fail)


# -- asyncio ----------------------------------------------------------------------------------------------


def test_astream_yields_what_stream_yields(pixtral):
    expected = [c for c in pixtral.stream_describe(picture(9), "Describe.", max_tokens=12, temperature=0)]

    async def collect() -> list:
        stream = pixtral.astream_describe(picture(9), "Describe.", max_tokens=12, temperature=0)
        return [c async for c in stream]

    received = asyncio.run(collect())
    assert [c.text for c in received[:-1]] == [c.text for c in expected[:-1]]
    assert received[-1].generated_tokens == expected[-1].generated_tokens


def test_leaving_an_async_stream_early_stops_it_and_frees_the_model(pixtral):
    async def read_three() -> int:
        ticks = 0

        async def heartbeat() -> None:  # proves the event loop keeps running during generation
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        beat = asyncio.create_task(heartbeat())
        n = 0
        async with contextlib.aclosing(pixtral.astream_describe(picture(10), max_tokens=LONG)) as stream:
            async for _chunk in stream:
                n += 1
                if n == 3:
                    break
        beat.cancel()
        return ticks

    started = time.monotonic()
    assert asyncio.run(read_three()) > 0
    for worker in [t for t in threading.enumerate() if t.name == "pixtral-cpp-stream"]:
        worker.join(1)  # it has closed its stream (lock released) and is returning
        assert not worker.is_alive()
    assert pixtral.describe(picture(10), max_tokens=2).stats.generated_tokens > 0
    assert time.monotonic() - started < 10


def test_async_errors_reach_the_consumer(pixtral):
    async def consume() -> None:
        async for _ in pixtral.astream_chat([{"role": "assistant", "content": "no question"}]):
            pass

    with pytest.raises(Exception) as raised:
        asyncio.run(consume())
    assert "pixtral_cpp" in type(raised.value).__module__


# -- threads ----------------------------------------------------------------------------------------------


def test_concurrent_describes_get_their_own_answers(pixtral):
    expected = {seed: greedy(pixtral, seed).text for seed in (11, 12)}
    results: dict[int, str] = {}
    threads = [threading.Thread(target=lambda s=seed: results.__setitem__(s, greedy(pixtral, s).text))
               for seed in (11, 12, 11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == expected


def test_a_second_call_from_the_thread_of_an_open_stream_is_refused(pixtral):
    stream = pixtral.stream_describe(picture(13), max_tokens=LONG)
    next(stream)
    with pytest.raises(ModelBusyError):
        pixtral.describe(picture(13), max_tokens=2)
    stream.close()
    assert pixtral.describe(picture(13), max_tokens=2).stats.generated_tokens > 0


# -- the README example -----------------------------------------------------------------------------------


def readme_examples() -> list[str]:
    section = README.read_text().split("## Embedding in apps", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


@pytest.mark.parametrize("index", [0, 1])
def test_readme_embedding_examples_run(pair, tmp_path, index):
    code = readme_examples()[index]
    photo = tmp_path / "photo.png"
    PILImage.fromarray(picture(14)).save(photo)
    script = tmp_path / "app.py"
    script.write_text(code)
    env = {**os.environ, "PIXTRAL_CPP_MODEL": str(pair[0])}
    done = subprocess.run([sys.executable, str(script), str(photo)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    if index == 0:
        assert re.search(r"\[(cancelled|stop|length): \d+ tokens\]", done.stdout), done.stdout[-300:]
        assert "load" in done.stderr and "100%" in done.stderr
