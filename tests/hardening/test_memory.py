"""The heap trimmer (app/memory.py) that lets memory return to baseline after a burst."""

from __future__ import annotations

import asyncio
import contextlib

from app.memory import malloc_trim, trim_heap_periodically


def test_memory_malloc_trim_is_found_and_callable_on_glibc() -> None:
    trim = malloc_trim()
    assert trim is not None  # the test machine and the Docker image run glibc
    assert trim() in (0, 1)  # 1: memory was released, 0: there was none to release


def test_memory_trimmer_calls_trim_until_cancelled() -> None:
    calls: list[None] = []

    async def scenario() -> None:
        task = asyncio.create_task(trim_heap_periodically(lambda: calls.append(None), 0.01))
        while len(calls) < 3:
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()

    asyncio.run(asyncio.wait_for(scenario(), timeout=10))
    assert len(calls) >= 3


def test_memory_trimmer_without_malloc_trim_ends_at_once() -> None:
    asyncio.run(asyncio.wait_for(trim_heap_periodically(None, 0.01), timeout=10))
