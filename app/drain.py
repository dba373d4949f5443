"""Graceful shutdown: on SIGTERM the gateway reports itself not ready and refuses new requests
while uvicorn lets the in-flight ones finish (up to `shutdown.drain_timeout`).

uvicorn owns the signal handling (it stops accepting connections and waits for open ones); this
module only chains onto its handler to flip a flag first, so /readyz fails at once and a request
that still arrives on a kept-alive connection gets a clean 503 instead of a half-served edit.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Overloaded, error_response
from app.request_record import current_record

log = logging.getLogger("gateway")

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# Liveness stays true while draining: the process is healthy, only leaving.
_ALWAYS_SERVED = frozenset({"/healthz", "/readyz"})


class Drain:
    def __init__(self) -> None:
        self.draining = False

    def begin(self) -> None:
        if not self.draining:
            self.draining = True
            log.info("draining: refusing new requests, finishing those in flight")

    def hook_signals(self) -> Callable[[], None]:
        """Begin draining on SIGTERM/SIGINT, then let the previous handler (uvicorn's) run.

        Returns the undo. Signal handlers belong to the main thread: elsewhere (an app served
        from a test thread) this does nothing.
        """
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
    """While draining, answer new requests 503 with `connection: close` instead of starting them."""

    def __init__(self, app: ASGIApp, *, drain: Drain) -> None:
        self.app = app
        self._drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._drain.draining or scope["path"] in _ALWAYS_SERVED:
            await self.app(scope, receive, send)
            return
        error = Overloaded(
            "The gateway is shutting down; retry the request.",
            code="gateway_draining",
            headers={"retry-after": "1", "connection": "close"},
        )
        current_record().note_error(code=error.code, param=None, failure=None)
        await error_response(error)(scope, receive, send)
