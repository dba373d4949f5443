"""Give freed heap memory back to the operating system while the gateway runs.

Uploads pass through memory in chunks of up to a few hundred KiB. glibc keeps freed chunks in its
heap for reuse, so after a burst (a storm of hostile clients, say) the process would stay near its
high-water mark for good. Calling malloc_trim(0) every few seconds hands the free pages back
(tests/bench/hostile.py: +14 MiB left after 64 hostile clients for 30 s without it, ~+1 MiB with
it). Where the C library has no malloc_trim (musl, macOS) this does nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_INTERVAL_SECONDS = 10.0


def malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0) as a callable, or None where the C library lacks it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: trim(0)


async def trim_heap_periodically(
    trim: Callable[[], object] | None, interval: float = TRIM_INTERVAL_SECONDS
) -> None:
    """Run `trim` every `interval` seconds until cancelled (the lifespan owns this task)."""
    if trim is None:
        return
    while True:
        await asyncio.sleep(interval)
        # A few milliseconds at most on the event loop, every ten seconds.
        trim()
