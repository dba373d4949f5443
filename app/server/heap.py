"""The process heap: freed memory kept for the next requests while busy, handed back when idle.

glibc serves large allocations (over 128 KiB, a threshold it raises as it goes) with their own
mmap, and returns the top of the heap to the kernel as soon as a few hundred KiB of it are free.
An edit allocates and frees megabytes in pieces of 64 KiB to 1 MiB (the chunks a body arrives in,
spooled reads, the upstream's answer), so by default every request started on fresh pages: a
page fault per 4 KiB touched, which in a VM costs more than the copies themselves (1 MB edits at
c=1 were answered 0.7-1.2 ms sooner with the heap kept; README "Performance").
`keep_freed_heap` keeps up to `limits.malloc_keep_bytes` of freed heap for reuse.

Kept memory must still go back once the load has passed (after a storm of hostile clients, say),
or the process would stay near its high-water mark for good: `malloc_trim(0)` every few seconds
hands the free pages back (tests/bench/hostile.py: +14 MiB left after 64 hostile clients for 30 s
without it, ~+1 MiB with it). Where the C library is not glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from collections.abc import Callable

TRIM_INTERVAL_SECONDS = 10.0
# mallopt() parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations up to this size come from the heap (their pages reused), not from their own mmap;
# glibc caps the parameter at 32 MiB on 64-bit systems.
MMAP_THRESHOLD_BYTES = 16 * 1024 * 1024


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl's mallopt is a stub)
    except (OSError, AttributeError):
        return None
    return libc


def keep_freed_heap(keep_bytes: int) -> bool:
    """Keep up to `keep_bytes` of freed heap in this process; False where nothing was tuned."""
    libc = _glibc()
    if libc is None or keep_bytes <= 0:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_ok = int(mallopt(_M_MMAP_THRESHOLD, min(MMAP_THRESHOLD_BYTES, keep_bytes))) == 1
    trim_ok = int(mallopt(_M_TRIM_THRESHOLD, min(keep_bytes, 2**31 - 1))) == 1
    return mmap_ok and trim_ok


def malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0) as a callable, or None where the C library lacks it."""
    libc = _glibc()
    if libc is None:
        return None
    trim = libc.malloc_trim
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
