"""The HTTP/1.1 protocol the server runs: uvicorn's httptools protocol, unchanged, plus a size cap
and a deadline for each request head, refused in OpenAI's error envelope.

uvicorn arms no timer before a connection's first response and httptools caps no header size, so
without this a client could hold a connection forever by trickling its head, or make the parser
buffer an endless header line. Only the head is watched here, through httptools' parser callbacks
and `data_received`; request bodies are uvicorn's, bounded by the intake (limits.body_idle_timeout,
limits.body_timeout, limits.max_body_bytes).
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.errors import error_envelope

# nginx's client_header_timeout is 60 s and its header buffers 32 KiB; browsers and SDKs send a
# whole head in one write, so these only ever cut off a client that is not really one.
HEAD_TIMEOUT_SECONDS = 30.0
MAX_HEAD_BYTES = 64 * 1024


class _Phase(enum.Enum):
    IDLE = "between requests"
    HEAD = "in a request head"
    BODY = "in a request body"


class _HeadTooLarge(Exception):
    """Raised in a parser callback: stops httptools before the oversized request reaches the app."""


def _refusal(status: int, reason: str, message: str, code: str) -> bytes:
    body = orjson.dumps(error_envelope(message, "invalid_request_error", None, code))
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    head_timeout: float = HEAD_TIMEOUT_SECONDS
    max_head_bytes: int = MAX_HEAD_BYTES

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _Phase.IDLE
        self._phase_changed = False  # since the current read began
        # A head is measured two ways and the larger counts: the URL and header lines the parser
        # handed over (exact whatever the reads, but blind to a line still arriving), and whole
        # reads that fell inside the head (which sees that line). Neither counts body bytes.
        self._head_line_bytes = 0
        self._head_read_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused: bytes | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # the first head is due within the deadline of the connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            return  # refused, waiting for an earlier answer to go out: the rest is not parsed
        started_in_body = self._phase is _Phase.BODY
        self._phase_changed = False
        super().data_received(data)
        if self._phase is not _Phase.HEAD or self._refused is not None:
            return
        if not started_in_body and not self._phase_changed:
            self._head_read_bytes += len(data)
        # Else the read began in an earlier request and how much of it is this head is unknown:
        # the lines it completes are counted, the rest of it not (an under-count of one read).
        if max(self._head_line_bytes, self._head_read_bytes) > self.max_head_bytes:
            self._refuse(self._head_too_large())

    # httptools parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._phase = _Phase.HEAD
        self._head_line_bytes = self._head_read_bytes = 0
        if self._head_timer is None:
            self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._head_line_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._head_line_bytes += len(name) + len(value) + 4  # ": " and CRLF

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        if self._head_line_bytes > self.max_head_bytes:
            # The parser stops here, so the request never reaches the app; uvicorn then calls
            # send_400_response, which sends this refusal instead.
            self._refuse(self._head_too_large())
            raise _HeadTooLarge
        super().on_headers_complete()
        self._phase = _Phase.BODY
        self._phase_changed = True

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._phase = _Phase.IDLE
        self._phase_changed = True

    # uvicorn's hooks

    def send_400_response(self, msg: str) -> None:
        self._refuse(
            _refusal(
                400, "Bad Request", f"{msg} The request is not valid HTTP/1.1.", "invalid_http"
            )
        )

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._refused is None or self.transport.is_closing():
            return
        if self._earlier_answer_pending():
            self.flow.pause_reading()  # super() resumed it for the next request
        else:
            self._send_refusal(self._refused)

    # the refusals

    def _head_too_large(self) -> bytes:
        return _refusal(
            431,
            "Request Header Fields Too Large",
            f"The request headers are larger than {self.max_head_bytes} bytes.",
            "headers_too_large",
        )

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._earlier_answer_pending():
            # The head may be waiting in a buffer uvicorn stopped reading while it answers an
            # earlier pipelined request: its clock restarts once that answer is out.
            self._arm_head_timer()
            return
        self._refuse(
            _refusal(
                408,
                "Request Timeout",
                f"The request headers did not arrive within {self.head_timeout:g} seconds.",
                "request_timeout",
            )
        )

    def _refuse(self, response: bytes) -> None:
        self._disarm_head_timer()
        if self._refused is not None or self.transport.is_closing():
            return
        self._refused = response
        if self._earlier_answer_pending():
            # Written after it, never over it; until then nothing more is read.
            self.flow.pause_reading()
        else:
            self._send_refusal(response)

    def _earlier_answer_pending(self) -> bool:
        """Whether a request before the refused one is still being answered."""
        if self._phase is _Phase.BODY:
            # The refused request is the latest one parsed: it waits while queued behind others.
            return bool(self.pipeline)
        return self.cycle is not None and not self.cycle.response_complete

    def _send_refusal(self, response: bytes) -> None:
        if not (self._phase is _Phase.BODY and self.cycle.response_started):
            # (A broken body whose own answer has begun can only be cut off.)
            self.transport.write(response)
        self.transport.close()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
