"""Admission control: a process-local cap on requests in flight, answered with 503 beyond it.

Each in-flight edit holds sockets, spooled upload bytes and an upstream connection for the
whole upstream call (60-150 s), so the cap bounds memory and descriptors, not CPU. The count is
per process: with N workers the gateway admits up to N times the configured number. GET and
HEAD requests (health, metrics, model list, hosted files) are cheap and never refused.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import Overloaded

# Liveness, readiness and scraping must keep answering while the gateway is full.
EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
EXEMPT_METHODS = frozenset({"GET", "HEAD"})


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_in_flight: int, retry_after_seconds: int) -> None:
        self.app = app
        self._max = max_in_flight
        self.in_flight = 0
        error = Overloaded(
            "The gateway is at its limit of requests in flight; retry after "
            f"{retry_after_seconds} s."
        )
        # The refusal is the same every time: build it once, so refusing costs next to nothing.
        self._body = orjson.dumps(error.envelope())
        self._status = error.status_code
        self._headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self._body)).encode()),
            (b"retry-after", str(retry_after_seconds).encode()),
            (b"retry-after-ms", str(retry_after_seconds * 1000).encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self._max <= 0
            or scope["type"] != "http"
            or scope["method"] in EXEMPT_METHODS
            or scope["path"] in EXEMPT_PATHS
        ):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self._max:
            # A fresh list each time: the request-id middleware adds its header to it.
            headers = list(self._headers)
            await send({"type": "http.response.start", "status": self._status, "headers": headers})
            await send({"type": "http.response.body", "body": self._body})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
