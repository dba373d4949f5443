"""How long a request waits for its answer: while its client is still connected, and no longer
than the client's own read timeout (the OpenAI SDKs send it as `x-stainless-read-timeout`).

Past either, the wait is cancelled and the request ends at once (no connection, worker or
in-flight slot held for nobody); work the wait started on its own, such as a paid upstream call,
goes on. The server tells the app of a disconnect only through `receive()`, so something must be
reading it while the app waits.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Coroutine, Mapping
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

T = TypeVar("T")

READ_TIMEOUT_HEADER = "x-stainless-read-timeout"
# The client's timeout runs from its last byte sent, this wait's from a moment later; the grace
# lets the client's own timeout, and the disconnect that follows, normally come first.
GRACE_SECONDS = 1.0
_MAX_SECONDS = 24 * 3600.0


def client_read_timeout(headers: Mapping[str, str]) -> float | None:
    """The client's read timeout in seconds, if it sent a usable one."""
    raw = headers.get(READ_TIMEOUT_HEADER)
    if raw is None:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return min(seconds, _MAX_SECONDS)


async def while_client_waits(receive: Receive, work: Coroutine[Any, Any, T]) -> T:
    """`work`'s result, unless the client disconnects first: then `work` is cancelled and
    ClientDisconnect raised. Cancelling this (a timeout around it) cancels `work` too.

    Call it once the request body has been read: from then on `receive()` only reports the
    disconnect.
    """
    task = asyncio.create_task(work)
    gone = asyncio.create_task(_disconnected(receive))
    try:
        done, _ = await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    gone.result()  # an error reading the connection is not a disconnect
    raise ClientDisconnect()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # body bytes after what the intake read (an epilogue) are dropped
