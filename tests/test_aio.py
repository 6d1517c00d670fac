"""LoopChannel, the one hand-over from a worker thread to the event loop (astream_* and the server's worker)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from pixtral_cpp.aio import ChannelClosed, LoopChannel


def _produce(target, *args) -> threading.Thread:
    thread = threading.Thread(target=target, args=args)
    thread.start()
    return thread


def test_items_arrive_in_order_then_the_error_then_the_end():
    async def consume() -> list[object]:
        channel: LoopChannel[int] = LoopChannel(asyncio.get_running_loop(), on_loop_gone=lambda: None)

        def produce() -> None:
            for number in range(100):
                channel.put(number)
            channel.fail(KeyError("carried"))
            channel.close()

        thread, seen = _produce(produce), []
        while True:
            try:
                seen.append(await channel.get())
            except KeyError as error:
                seen.append(error)
            except ChannelClosed:
                break
        thread.join()
        with pytest.raises(ChannelClosed):  # and it stays closed
            await channel.get()
        return seen

    seen = asyncio.run(consume())
    assert seen[:100] == list(range(100)) and isinstance(seen[100], KeyError) and len(seen) == 101


def test_a_get_that_times_out_loses_nothing():
    async def consume() -> list[int]:
        channel: LoopChannel[int] = LoopChannel(asyncio.get_running_loop(), on_loop_gone=lambda: None)
        with pytest.raises(asyncio.TimeoutError):
            await channel.get(timeout=0.01)
        release = threading.Event()
        thread = _produce(lambda: (release.wait(), channel.put(1), channel.put(2)))
        timeouts = 0
        while timeouts < 3:  # several polls time out while the producer waits
            try:
                await channel.get(timeout=0.01)
            except asyncio.TimeoutError:
                timeouts += 1
        release.set()
        got = [await channel.get(timeout=5), await channel.get(timeout=5)]
        thread.join()
        return got

    assert asyncio.run(consume()) == [1, 2]


def test_wait_closed_drops_what_is_left_errors_included():
    async def consume() -> None:
        channel: LoopChannel[int] = LoopChannel(asyncio.get_running_loop(), on_loop_gone=lambda: None)
        thread = _produce(lambda: (channel.put(1), channel.fail(KeyboardInterrupt()), channel.close()))
        await channel.wait_closed()  # raises nothing, not even the KeyboardInterrupt
        thread.join()
        with pytest.raises(ChannelClosed):
            await channel.get()

    asyncio.run(consume())


def test_a_closed_loop_tells_the_producer_to_stop_instead_of_raising():
    gone = threading.Event()

    async def make() -> LoopChannel[int]:
        return LoopChannel(asyncio.get_running_loop(), on_loop_gone=gone.set)

    channel = asyncio.run(make())  # asyncio.run closes its loop on return
    channel.put(1)
    channel.close()
    assert gone.is_set()
