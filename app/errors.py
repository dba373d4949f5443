"""The gateway's error hierarchy and the one place that renders OpenAI's error envelope.

GatewayError
 ├── InvalidRequest            400 invalid_request_error (a field the client can fix)
 │    └── NotFound             404 no such file, client, key or endpoint
 │         └── ModelNotFound   404 model_not_found
 ├── AuthenticationFailed      401 invalid_api_key
 ├── PermissionDenied          403 the client may not use this model
 ├── RequestTimeout            408 the client stopped sending its body
 ├── PayloadTooLarge           413 a size limit was crossed while the body streamed in
 ├── UnsupportedMediaType      415 the body is not multipart/form-data
 ├── RateLimited               429 the upstream (or every key) is rate limited, or the client's
 │    │                            own limit (requests/images per minute, concurrency) is reached
 │    └── QuotaExceeded        429 insufficient_quota: the client's daily/monthly images are used
 ├── UpstreamRejected          the upstream's own 4xx, passed through (secrets scrubbed)
 ├── UpstreamFailed            502 upstream 5xx, auth failure of our key, malformed answer
 ├── UpstreamUnreachable       502 connection failed before the request was delivered
 ├── UpstreamTimeout           504 the upstream did not answer within the model's timeout
 ├── Overloaded                503 the gateway is at its concurrency limit
 ├── ShuttingDown              503 the gateway is draining: refused at the door, or cut off at
 │                                 the drain limit
 ├── StoreUnavailable          503 shared state (Redis) is needed and cannot be reached: every
 │                                 store translates Redis's own errors into this, once
 └── NoUsableKey               503 every upstream key is disabled, ejected or busy

An error says everything about itself when it is built: its status (by class), headers, and for
an upstream failure its kind and the upstream's rate-limit headers (for the key pool).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal, Self

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.observability.record import record_in

log = logging.getLogger("gateway.errors")

# What went wrong upstream, for the key pool and metrics to act on (never shown to clients):
#   rate_limited 429 | auth 401/403 | quota 402, insufficient_quota | server 5xx
#   connect: never delivered | timeout: no answer in time (may be running and billed)
#   dropped: connection lost mid-request (may be running and billed)
#   rejected: the upstream's own 4xx about the request | bad_response: unusable 200
#   accepted: the upstream accepted a request it bills on submit (a BFL task), then it failed
FailureKind = Literal[
    "rate_limited",
    "auth",
    "quota",
    "server",
    "connect",
    "timeout",
    "dropped",
    "rejected",
    "bad_response",
    "accepted",
]

# Questions about a failed upstream call, one set each (FailureKind lives here, not in
# app/upstream/failures.py, because every GatewayError carries one).
#
# Did the upstream run the edit? Unknown after these: the request was delivered and no answer
# came back, so the edit may be running and billed. Sending it again may pay twice, so it is
# resent only for models that allow it (routing), and the SDK is told not to retry.
#   timeout   no answer within the time allowed
#   dropped   the connection broke after the request went out (or a stream broke mid-way)
OUTCOME_UNKNOWN: frozenset[FailureKind] = frozenset({"timeout", "dropped"})
# Was it paid for, whatever came after? After these, yes: a provider that bills on submit (BFL)
# accepted the task, then polling, the task itself or its result download failed. Never sent
# again, on any key or upstream, whatever the model allows; the SDK is told not to retry.
PAID: frozenset[FailureKind] = frozenset({"accepted"})
# May the upstream have billed for it? After these the client's image charge is kept (tenants):
#   timeout, dropped   as above: the edit may have been made
#   bad_response       the upstream answered 200, so it made (and billed) the images, but the
#                      answer could not be used (routing still retries it: only a new call can
#                      give the client its images)
#   accepted           as above: the task was accepted, so it was billed
MAYBE_BILLED: frozenset[FailureKind] = OUTCOME_UNKNOWN | PAID | {"bad_response"}


class GatewayError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        failure: FailureKind | None = None,
        upstream_headers: Mapping[str, str] | None = None,
    ) -> None:
        """`failure` is set by upstream dialects only (None: the gateway found the error
        itself); `upstream_headers` are the upstream's rate-limit headers (retry-after,
        x-ratelimit-*), for the key pool, never sent to the client."""
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = dict(headers or {})
        self.failure = failure
        self.upstream_headers = dict(upstream_headers or {})

    def with_headers(self, headers: Mapping[str, str]) -> Self:
        """This error, answered with `headers` as well. A copy: the error as raised by the
        layer below stays as it was."""
        clone = type(self).__new__(type(self), *self.args)
        clone.__dict__.update(self.__dict__)
        clone.headers = {**self.headers, **headers}
        return clone

    def with_failure(self, failure: FailureKind) -> Self:
        """This error, reported as a failure of kind `failure` (a copy, like with_headers)."""
        clone = self.with_headers({})
        clone.failure = failure
        return clone

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class NotFound(InvalidRequest):
    status_code = 404
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class AuthenticationFailed(GatewayError):
    status_code = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status_code = 403
    error_type = "invalid_request_error"
    default_code = "model_not_allowed"


class RequestTimeout(GatewayError):
    status_code = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class UnsupportedMediaType(GatewayError):
    status_code = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(GatewayError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class QuotaExceeded(RateLimited):
    error_type = "insufficient_quota"
    default_code = "insufficient_quota"


class UpstreamRejected(GatewayError):
    """An upstream 4xx the client should see as-is (bad request, moderation, ...), with the
    status the gateway answers it with."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str,
        param: str | None,
        code: str | None,
        headers: Mapping[str, str] | None = None,
        upstream_headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            message,
            param=param,
            code=code,
            headers=headers,
            failure="rejected",
            upstream_headers=upstream_headers,
        )
        self.status_code = status_code
        self.error_type = error_type


class UpstreamFailed(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_error"


class UpstreamUnreachable(GatewayError):
    status_code = 502
    error_type = "upstream_error"
    default_code = "upstream_unreachable"


class UpstreamTimeout(GatewayError):
    status_code = 504
    error_type = "upstream_error"
    default_code = "upstream_timeout"


class Overloaded(GatewayError):
    status_code = 503
    error_type = "server_error"
    default_code = "gateway_overloaded"


class ShuttingDown(GatewayError):
    status_code = 503
    error_type = "server_error"
    default_code = "gateway_draining"


class StoreUnavailable(GatewayError):
    """Shared state could not be reached. The stores raise it in place of Redis's own errors
    (app/shared_state/failures.py); the ones that fail open catch it, the others answer 503."""

    status_code = 503
    error_type = "server_error"
    default_code = "store_unavailable"

    def __init__(
        self, message: str, *, action: str | None = None, cause: str | None = None
    ) -> None:
        super().__init__(message)
        self.action = action  # what could not be done ("admit a request"), for the log
        self.cause = cause  # the type of the store's own error, for the log


class NoUsableKey(GatewayError):
    status_code = 503
    error_type = "server_error"
    default_code = "no_upstream_key_available"


def error_envelope(
    message: str, error_type: str, param: str | None, code: str | None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: GatewayError, redact: Callable[[str], str] | None = None) -> Response:
    return _render(error.envelope(), error.status_code, error.headers, redact)


def _render(
    envelope: dict[str, Any],
    status_code: int,
    headers: Mapping[str, str],
    redact: Callable[[str], str] | None,
) -> Response:
    if redact is not None:
        # Messages quote client input; a client that pastes a key into a field never gets any
        # key back, and neither does anyone reading the response on the way.
        envelope["error"] = {
            name: redact(value) if isinstance(value, str) else value
            for name, value in envelope["error"].items()
        }
    return Response(
        orjson.dumps(envelope),
        status_code=status_code,
        media_type="application/json",
        headers=dict(headers),
    )


_HTTP_ERRORS = {
    404: ("Unknown endpoint.", "not_found"),
    405: ("Method not allowed on this endpoint.", "method_not_allowed"),
}


def _validation_param(exc: RequestValidationError) -> str | None:
    for item in exc.errors():
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query")]
        if loc:
            return ".".join(loc)
    return None


def install_error_handlers(app: FastAPI, *, redact: Callable[[str], str] | None = None) -> None:
    """Every error leaves the gateway in OpenAI's envelope; FastAPI's 422 shape never does."""

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        record_in(request.scope).note_error(code=exc.code, param=exc.param, failure=exc.failure)
        return error_response(exc, redact)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(
            InvalidRequest("The request is malformed.", param=_validation_param(exc)), redact
        )

    async def on_http_error(_: Request, exc: Exception) -> Response:
        # The framework's own refusals (no such route, wrong method, a body FastAPI cannot
        # parse), answered with the status it chose.
        assert isinstance(exc, StarletteHTTPException)
        message, code = _HTTP_ERRORS.get(exc.status_code, (str(exc.detail), None))
        envelope = error_envelope(message, InvalidRequest.error_type, None, code)
        # Starlette's headers for these (a 405's `Allow`, which HTTP requires) go out as well.
        return _render(envelope, exc.status_code, exc.headers or {}, redact)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # The trace goes to our log; the client gets a request id to quote, never the trace.
        request_id = getattr(request.state, "request_id", None)
        log.error("unhandled error (request %s)", request_id, exc_info=exc)
        return error_response(
            GatewayError("The gateway hit an internal error.", code="internal_error")
        )

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
