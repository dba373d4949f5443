"""The HTTP/1.1 connection protocol the server runs: uvicorn's httptools protocol with a deadline
and a size cap for request headers, answering in OpenAI's error envelope when it refuses, and
request bodies handed to the app as the chunks that arrived.

uvicorn arms no timer before a connection's first response and httptools caps no header size, so
without this a client can hold a connection forever by trickling (or never sending) its headers.
The request body is bounded separately, by the intake (limits.body_idle_timeout, max_body_bytes).

uvicorn appends every received body chunk to a bytearray and copies it out again for each ASGI
receive: two copies of every uploaded byte plus the bytearray's reallocations, about 1 ms of CPU
per MB on this kind of VM (as much as everything else the gateway does for a 1 MB edit). Here
the chunks httptools produced are kept as they are and passed on, one per receive.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import orjson
from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.http.flow_control import HIGH_WATER_LIMIT
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from app.errors import error_envelope

# nginx's client_header_timeout is 60 s and its header buffers 32 KiB; browsers and SDKs send a
# whole header block in one write, so these only ever cut off a client that is not really one.
HEADER_TIMEOUT_SECONDS = 30.0
MAX_HEADER_BYTES = 64 * 1024


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = orjson.dumps(error_envelope(message, "invalid_request_error", None, code))
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    header_timeout: float = HEADER_TIMEOUT_SECONDS
    max_header_bytes: int = MAX_HEADER_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        # Bytes received since the current request began and before its headers completed.
        self._header_bytes: int | None = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_header_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_clock()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._header_bytes is None or self.transport.is_closing():
            return
        # Headers still incomplete after parsing this chunk: all of it was header bytes.
        self._header_bytes += len(data)
        if self._header_bytes > self.max_header_bytes:
            self._refuse(
                431,
                "Request Header Fields Too Large",
                f"The request headers are larger than {self.max_header_bytes} bytes.",
                "headers_too_large",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._start_header_clock()

    def on_headers_complete(self) -> None:
        self._stop_header_clock()
        super().on_headers_complete()
        cycle = self.cycle
        if type(cycle) is RequestResponseCycle:
            # The cycle uvicorn just made for this request (its task has not run yet): same
            # state, with the body kept as chunks.
            cycle.__class__ = _ChunkedBodyCycle
            assert isinstance(cycle, _ChunkedBodyCycle)
            cycle.chunks = collections.deque()
            cycle.buffered = 0

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if not isinstance(cycle, _ChunkedBodyCycle):
            super().on_body(body)
            return
        if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
            return
        cycle.chunks.append(body)
        cycle.buffered += len(body)
        if cycle.buffered > HIGH_WATER_LIMIT:
            self.flow.pause_reading()
        cycle.message_event.set()

    def send_400_response(self, msg: str) -> None:
        self._refuse(
            400, "Bad Request", f"{msg} The request is not valid HTTP/1.1.", "invalid_http"
        )

    def _start_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_bytes = 0
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _stop_header_clock(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._header_bytes = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        self._refuse(
            408,
            "Request Timeout",
            f"The request headers did not arrive within {self.header_timeout:g} seconds.",
            "request_timeout",
        )

    def _refuse(self, status: int, reason: str, message: str, code: str) -> bool:
        self._stop_header_clock()
        if self.transport.is_closing():
            return False
        self.transport.write(_refusal(status, reason, message, code))
        self.transport.close()
        return True


class _ChunkedBodyCycle(RequestResponseCycle):
    """uvicorn's request/response cycle, its body waiting as received chunks."""

    chunks: collections.deque[bytes]
    buffered: int

    async def receive(self) -> ASGIReceiveEvent:
        message = await super().receive()  # its own (empty) bytearray body is ignored
        if message["type"] == "http.request" and self.chunks:
            # One chunk per message, never joined: the intake keeps them as they are.
            body = self.chunks.popleft()
            self.buffered -= len(body)
            message["body"] = body
            if self.chunks:
                message["more_body"] = True
                self.message_event.set()  # the next receive returns at once
        return message
