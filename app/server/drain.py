"""Graceful shutdown inside a worker: refuse new requests the moment SIGTERM arrives, give those in
flight `shutdown.drain_timeout` seconds, then cut off what is left and answer it.

uvicorn owns the signal and the listening socket: on SIGTERM it stops accepting connections and
waits for open ones (with `--workers`, app/server/workers.py shuts the shared socket in the parent).
This module chains onto its handler to flip a flag first, so a request that still arrives on an
open connection, a probe included, gets 503 with `connection: close` instead of being started.

The drain limit is kept here rather than left to uvicorn's `timeout_graceful_shutdown` (set a
few seconds longer, as a backstop): uvicorn cancels the request tasks it finds still running,
and each one then surfaces as "Exception in ASGI application" with a CancelledError traceback and
a 500 for a client that may be long gone. Cut off here, a request still running at the limit is
answered 503 `gateway_shutdown` (or, mid-stream, ended with that error event), and its log line
says so.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ShuttingDown, error_response
from app.observability.record import record_in
from app.service.streaming import sse

log = logging.getLogger("gateway")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_PROBES = frozenset({"/healthz", "/readyz"})
_CLOSE = {"retry-after": "1", "connection": "close"}


class Drain:
    """Whether this process is draining, and the deadline of the requests still running."""

    def __init__(self, limit: float) -> None:
        self.draining = False
        self._seconds = limit
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadline: float | None = None  # the event loop's clock
        self._running: set[asyncio.Timeout] = set()

    def begin(self) -> None:
        """Start draining. Safe from a signal handler and from any thread."""
        if self.draining:
            return
        self.draining = True
        if self._loop is not None:
            # The deadlines belong to the event loop; a signal handler must not touch them.
            self._loop.call_soon_threadsafe(self._start_clock)

    def _start_clock(self) -> None:
        assert self._loop is not None
        log.info(
            "draining: refusing new requests, finishing %d in flight (at most %g s)",
            len(self._running),
            self._seconds,
        )
        self._deadline = self._loop.time() + self._seconds
        for running in self._running:
            running.reschedule(self._deadline)

    def remaining(self) -> float:
        """Seconds left of the drain limit: all of it until draining starts."""
        if self._deadline is None or self._loop is None:
            return self._seconds
        return max(0.0, self._deadline - self._loop.time())

    @asynccontextmanager
    async def limit(self) -> AsyncIterator[asyncio.Timeout]:
        """Run one request under the drain deadline (none until draining starts)."""
        async with asyncio.timeout_at(self._deadline) as running:
            self._running.add(running)
            try:
                yield running
            finally:
                self._running.discard(running)

    def open(self) -> Callable[[], None]:
        """From the lifespan: take the running event loop and hook SIGTERM/SIGINT; returns the undo.

        Signal handlers belong to the main thread: elsewhere (an app served from a test thread)
        only the loop is taken, and `begin()` is called by whoever stops the server.
        """
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {sig: signal.getsignal(sig) for sig in _SIGNALS}

        def on_signal(sig: int, frame: FrameType | None) -> None:
            self.begin()
            handler = previous[signal.Signals(sig)]
            if callable(handler):
                handler(sig, frame)
                return
            # No server handler to defer to: restore the default and let it act.
            signal.signal(sig, handler)
            signal.raise_signal(sig)

        for sig in _SIGNALS:
            signal.signal(sig, on_signal)

        def unhook() -> None:
            for sig, handler in previous.items():
                if signal.getsignal(sig) is on_signal:
                    signal.signal(sig, handler)

        return unhook


class DrainMiddleware:
    """While draining, answer new requests 503 instead of starting them; at the drain limit, cut
    off and answer the ones still running."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self._drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._drain.draining:
            await _refuse(scope, receive, send)
            return
        answer = _Answer()

        async def watching_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                answer.client_gone = True
            return message

        async def watching_send(message: Message) -> None:
            answer.saw(message)
            await send(message)

        try:
            async with self._drain.limit() as running:
                await self.app(scope, watching_receive, watching_send)
        except TimeoutError:
            if not running.expired():
                raise  # not the drain limit: someone else's timeout
            await _cut_off(answer, scope, receive, send)


class _Answer:
    """How far the response to one request got."""

    def __init__(self) -> None:
        self.started = False
        self.complete = False
        self.event_stream = False
        self.client_gone = False

    def saw(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            self.event_stream = any(
                name.lower() == b"content-type" and value.startswith(b"text/event-stream")
                for name, value in message.get("headers", ())
            )
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.complete = True


async def _refuse(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["path"] in _PROBES:
        # Out of rotation for load balancers; liveness too: the process is leaving (Kubernetes
        # stops liveness probes of a terminating pod, so this never gets it killed early).
        await _probe_draining(send)
        return
    error = ShuttingDown("The gateway is shutting down; retry the request.", headers=dict(_CLOSE))
    record_in(scope).note_error(code=error.code, param=None, failure=None)
    await error_response(error)(scope, receive, send)


async def _cut_off(answer: _Answer, scope: Scope, receive: Receive, send: Send) -> None:
    error = ShuttingDown(
        "The gateway shut down before this request finished; retry the request.",
        code="gateway_shutdown",
        headers=dict(_CLOSE),
    )
    if answer.complete:
        return  # answered already; only the app's own work after it was cut short
    record_in(scope).note_error(code=error.code, param=None, failure=None)
    if answer.client_gone:
        return  # nobody to answer: logged as 499
    if not answer.started:
        await error_response(error)(scope, receive, send)
    elif answer.event_stream:
        # The stream's status went out long ago: an error event is the answer left to give.
        await send({"type": "http.response.body", "body": sse(error.envelope(), "error")})
    # Any other half-sent answer: uvicorn closes the connection, and the client sees it cut.


async def _probe_draining(send: Send) -> None:
    body = b'{"status":"draining"}'
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.encode(), value.encode()) for name, value in _CLOSE.items()),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
