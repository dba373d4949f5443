"""The gateway's error hierarchy and the one place that renders OpenAI's error envelope.

GatewayError
 ├── InvalidRequest            400 invalid_request_error (a field the client can fix)
 │    └── ModelNotFound        404 model_not_found
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
 ├── StoreUnavailable          503 shared state (Redis) is needed and cannot be reached
 └── NoUsableKey               503 every upstream key is disabled, ejected or busy
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.request_record import current_record

log = logging.getLogger("gateway.errors")

# What went wrong upstream, for the key pool and metrics to act on (never shown to clients):
#   rate_limited 429 | auth 401/403 | quota 402, insufficient_quota | server 5xx
#   connect: never delivered | timeout: no answer in time (may be running and billed)
#   dropped: connection lost mid-request (may be running and billed)
#   rejected: the upstream's own 4xx about the request | bad_response: unusable 200
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
]


class GatewayError(Exception):
    status_code: int = 500
    error_type: str = "server_error"
    default_code: str | None = None
    # Set by upstream dialects only; None for errors the gateway found itself.
    failure: FailureKind | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers or {}
        # The upstream's rate-limit headers (retry-after, x-ratelimit-*), for the key pool.
        self.upstream_headers: dict[str, str] = {}

    def envelope(self) -> dict[str, Any]:
        return error_envelope(self.message, self.error_type, self.param, self.code)


class InvalidRequest(GatewayError):
    status_code = 400
    error_type = "invalid_request_error"


class ModelNotFound(InvalidRequest):
    status_code = 404
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
    """An upstream 4xx the client should see as-is (bad request, moderation, ...)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str,
        param: str | None,
        code: str | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code, headers=headers)
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
    status_code = 503
    error_type = "server_error"
    default_code = "store_unavailable"


class NoUsableKey(GatewayError):
    status_code = 503
    error_type = "server_error"
    default_code = "no_upstream_key_available"


def error_envelope(
    message: str, error_type: str, param: str | None, code: str | None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: GatewayError, redact: Callable[[str], str] | None = None) -> Response:
    envelope = error.envelope()
    if redact is not None:
        # Messages quote client input; a client that pastes a key into a field never gets any
        # key back, and neither does anyone reading the response on the way.
        envelope["error"] = {
            name: redact(value) if isinstance(value, str) else value
            for name, value in envelope["error"].items()
        }
    return Response(
        orjson.dumps(envelope),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers,
    )


def _validation_param(exc: RequestValidationError) -> str | None:
    for item in exc.errors():
        loc = [str(part) for part in item.get("loc", ()) if part not in ("body", "query")]
        if loc:
            return ".".join(loc)
    return None


def install_error_handlers(app: FastAPI, *, redact: Callable[[str], str] | None = None) -> None:
    """Every error leaves the gateway in OpenAI's envelope; FastAPI's 422 shape never does."""

    async def on_gateway_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        current_record().note_error(code=exc.code, param=exc.param, failure=exc.failure)
        return error_response(exc, redact)

    async def on_validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(
            InvalidRequest("The request is malformed.", param=_validation_param(exc)), redact
        )

    async def on_http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            error: GatewayError = InvalidRequest("Unknown endpoint.", code="not_found")
        elif exc.status_code == 405:
            error = InvalidRequest(
                "Method not allowed on this endpoint.", code="method_not_allowed"
            )
        else:
            error = InvalidRequest(str(exc.detail))
        error.status_code = exc.status_code
        # Starlette's headers for these (a 405's `Allow`, which HTTP requires) go out as well.
        error.headers.update(exc.headers or {})
        return error_response(error, redact)

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
