"""Per-request observability: time and size every request, count it, and write its log line.

A pure ASGI middleware around the whole app (inside the request id, outside auth, so refusals
are counted too). What the request did is read from its RequestRecord, which the inner layers
fill in; this is the one place that turns it into metrics and one JSON log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.logs import ACCESS_LOGGER, FIELDS
from app.observability.metrics import OTHER, GatewayMetrics
from app.observability.record import RequestRecord, open_record

# nginx's "client closed request": logged for a request that ended with nobody to answer.
CLIENT_GONE = 499
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# Refusals that are the client's to fix (401 is authentication, counted by status only).
_REJECTION_STATUSES = frozenset({400, 404, 409, 413, 415, 422})


class ObservabilityMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.perf_counter,
        logger: logging.Logger | None = None,
    ) -> None:
        self.app = app
        self._metrics = metrics
        self._clock = clock
        self._log = logger or logging.getLogger(ACCESS_LOGGER)
        # Exact paths of parameterless routes, learned as the router matches them, so that a
        # request refused before routing (a 401) is still labelled with its route.
        self._known_paths: dict[str, str] = {}

    def _route(self, scope: Scope) -> str:
        """The route template the router matched; never the raw path of an unknown route."""
        route = scope.get("route")
        template = getattr(route, "path", None)
        path: str = scope["path"]
        if isinstance(template, str):
            if template == path:
                self._known_paths.setdefault(path, template)
            return template
        return self._known_paths.get(path, OTHER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = open_record(scope)
        start = self._clock()
        status: int | None = None
        abandoned = False
        bytes_in = 0
        bytes_out = 0

        async def counting_receive() -> Message:
            nonlocal bytes_in, abandoned
            message = await receive()
            if message["type"] == "http.request":
                bytes_in += len(message.get("body", b""))
            elif message["type"] == "http.disconnect":
                abandoned = True
            return message

        async def counting_send(message: Message) -> None:
            nonlocal status, bytes_out
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-request-id":
                        # The route passed the upstream's id on: that is the one the client saw.
                        record.client_request_id = value.decode("latin-1")[:200]
            elif message["type"] == "http.response.body":
                bytes_out += len(message.get("body", b""))
            await send(message)

        # Probes and scrapes are not work in flight.
        counted = scope["path"] not in PROBE_PATHS
        if counted:
            self._metrics.request_started()
        try:
            await self.app(scope, counting_receive, counting_send)
        except asyncio.CancelledError:
            # Cancelled before answering (the server giving up on it at shutdown): nobody
            # is answered, so no 500 is counted for it.
            abandoned = True
            raise
        finally:
            if counted:
                self._metrics.request_ended()
            seconds = self._clock() - start
            route = self._route(scope)
            if status is None:
                # No answer went out: the client left (or the request was cancelled), as
                # nginx's 499; otherwise the server answers 500 for the app.
                status = CLIENT_GONE if abandoned else 500
            self._finish(scope, route, record, status, seconds, bytes_in, bytes_out)

    def _finish(
        self,
        scope: Scope,
        route: str,
        record: RequestRecord,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        metrics = self._metrics
        metrics.request_finished(
            route=route,
            model=record.model,
            status=status,
            seconds=seconds,
            bytes_in=bytes_in,
            bytes_out=bytes_out,
        )
        if record.upload_bytes:
            metrics.record_upload(record.model, record.upload_bytes)
        if status == 200 and record.images_out:
            metrics.record_images(record.model, record.images_out)
        rejected = record.error_code is not None and record.failure is None
        if rejected and status in _REJECTION_STATUSES:
            metrics.record_rejection(record.error_param)
        if self._log.isEnabledFor(logging.INFO):
            self._log.info(
                "request",
                extra={
                    FIELDS: _log_fields(scope, route, record, status, seconds, bytes_in, bytes_out)
                },
            )


def _log_fields(
    scope: Scope,
    route: str,
    record: RequestRecord,
    status: int,
    seconds: float,
    bytes_in: int,
    bytes_out: int,
) -> dict[str, object]:
    fields: dict[str, object] = {
        # What the client saw (the upstream's id when it was passed on), and the gateway's own.
        "request_id": record.client_request_id or record.request_id,
        "gateway_request_id": record.request_id,
        "client_id": scope.get("state", {}).get("client_id"),
        "method": scope.get("method"),
        "route": route,
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
        "model": record.model,
        "upstream": record.upstream,
        "key_id": record.key_id,
        "attempts": record.attempts,
        "cache": record.cache,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "upload_bytes": record.upload_bytes,
        "images_in": record.images_in,
        "images_out": record.images_out,
        "prompt_chars": record.prompt_chars,
        "error_code": record.error_code,
        "error_param": record.error_param,
        "failure": record.failure,
    }
    if record.prompt is not None:
        fields["prompt"] = record.prompt
    return fields
