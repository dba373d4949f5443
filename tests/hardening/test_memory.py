"""The process heap (app/server/heap.py): freed memory kept for the next requests, and trimmed
back to baseline after a burst."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

from app.server.heap import keep_freed_heap, malloc_trim, trim_heap_periodically


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


# A child process's minor page faults over 50 bursts of 4 MiB in 256 KiB pieces (the way upload
# chunks come and go), with malloc's defaults or with the heap kept.
_BURSTS = """
import resource, sys
from app.server.heap import keep_freed_heap
tuned = keep_freed_heap(64 << 20) if sys.argv[1] == "kept" else False
def burst():
    pieces = [b"x" * (256 << 10) for _ in range(16)]
    del pieces
burst()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    burst()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> tuple[bool, int]:
    result = subprocess.run(
        [sys.executable, "-c", _BURSTS, mode],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=60,
    )
    tuned, faults = result.stdout.split()
    return tuned == "True", int(faults)


def test_kept_heap_serves_repeated_bursts_without_new_page_faults() -> None:
    _, default_faults = _page_faults("default")
    tuned, kept_faults = _page_faults("kept")
    assert tuned  # the test machine and the Docker image run glibc
    assert default_faults > 10_000  # ~1000 per burst: every burst on fresh pages
    assert kept_faults < default_faults / 20


def test_keeping_nothing_leaves_malloc_alone() -> None:
    assert keep_freed_heap(0) is False
