"""The server-sent events answer of a streaming request (`stream=true`).

Partial images are written the moment the upstream dialect hands them to the stream's sink;
while nothing arrives a keep-alive comment holds the connection (upstreams that cannot stream,
BFL and the demo, only ever produce these); the final image goes out as `completed` events, built
from the same result the cache stores. A failure, before or after the first event, becomes one
`data: {"error": {...}}` event, which the OpenAI SDK raises as an APIError.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import orjson

from app.errors import GatewayError
from app.intake.request import EditRequest
from app.upstream.base import PartialSink

log = logging.getLogger("gateway.streaming")

KEEPALIVE_SECONDS = 10.0
_KEEPALIVE = b": keep-alive\n\n"


def sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def completed_events(edit: EditRequest, body: dict[str, Any]) -> list[dict[str, Any]]:
    """One `<prefix>.completed` event per image of a b64_json ImagesResponse."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        usage = {
            "input_tokens": 0,
            "output_tokens": 0,
            "total_tokens": 0,
            "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
        }
    shared: dict[str, Any] = {
        "type": f"{edit.event_prefix}.completed",
        "created_at": body.get("created", 0),
        "background": body.get("background") or edit.params.get("background") or "auto",
        "output_format": body.get("output_format") or edit.params.get("output_format") or "png",
        "quality": body.get("quality") or edit.params.get("quality") or "auto",
        "size": body.get("size") or edit.params.get("size") or "auto",
        "usage": usage,
    }
    return [{**shared, "b64_json": item.get("b64_json", "")} for item in body.get("data", [])]


async def event_stream(
    edit: EditRequest,
    produce: Callable[[PartialSink], Coroutine[Any, Any, dict[str, Any]]],
    *,
    redact: Callable[[str], str],
    finish: Callable[[], Awaitable[None]],
    keepalive_seconds: float = KEEPALIVE_SECONDS,
    raise_before_events: bool = False,
) -> AsyncGenerator[bytes, None]:
    """The SSE body. `produce(on_partial)` answers the request (cache, upstream) with a b64_json
    ImagesResponse, handing each partial image to `on_partial` on the way; `finish` runs once
    the stream ends, however it ends. With `raise_before_events`, a GatewayError that comes
    before any event is raised, not sent."""
    partials: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    work = asyncio.create_task(produce(partials.put_nowait), name="streamed-answer")
    waiting: asyncio.Task[dict[str, Any]] | None = None
    started = False
    try:
        while not work.done():
            if waiting is None:
                waiting = asyncio.create_task(partials.get())
            done, _ = await asyncio.wait(
                {waiting, work}, timeout=keepalive_seconds, return_when=asyncio.FIRST_COMPLETED
            )
            if waiting in done:
                started = True
                yield _partial(edit, waiting.result())
                waiting = None
            elif not done:
                started = True
                yield _KEEPALIVE
        while not partials.empty():
            started = True
            yield _partial(edit, partials.get_nowait())
        try:
            body = work.result()
        except Exception as exc:
            if isinstance(exc, GatewayError) and not started and raise_before_events:
                # Nothing was sent yet: a real status (429 with retry-after...) says more.
                raise
            if not isinstance(exc, GatewayError):
                # Headers are long gone: the error event is the only answer left to give.
                log.exception("streamed answer failed")
                exc = GatewayError("The gateway failed while answering; retry the request.")
            envelope = exc.envelope()
            envelope["error"] = {
                name: redact(value) if isinstance(value, str) else value
                for name, value in envelope["error"].items()
            }
            yield sse(envelope, "error")
            return
        for event in completed_events(edit, body):
            yield sse(event, event["type"])
    finally:
        if waiting is not None:
            waiting.cancel()
        if not work.done():
            # The client left: the wait ends here; a paid upstream call runs on (app/cache).
            work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        await finish()


async def prepend(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        # A client that leaves closes this wrapper; the stream's own cleanup must run now.
        await rest.aclose()


def _partial(edit: EditRequest, event: dict[str, Any]) -> bytes:
    # The upstream's own event, under the type this endpoint's clients parse.
    kind = f"{edit.event_prefix}.partial_image"
    return sse({**event, "type": kind}, kind)
