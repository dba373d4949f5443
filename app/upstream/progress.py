"""Partial images on their way from an upstream dialect to the client of a streaming request.

The route that streams sets a sink for its request; a dialect relaying an upstream's SSE hands
each partial image to it as it arrives. The sink travels in a context variable because the
upstream call runs in a task of its own (app/cache), which copies the request's context.
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any

PartialSink = Callable[[dict[str, Any]], None]

_sink: ContextVar[PartialSink | None] = ContextVar("partial_image_sink", default=None)


def relay_partials_to(sink: PartialSink | None) -> Token[PartialSink | None]:
    return _sink.set(sink)


def relay_partial(event: dict[str, Any]) -> bool:
    """Hand a partial image event to the streaming client, if one is waiting; True if so."""
    sink = _sink.get()
    if sink is None:
        return False
    sink(event)
    return True
