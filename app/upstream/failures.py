"""The upstream failures every dialect reports the same way, tagged with their failure kind."""

from __future__ import annotations

from typing import Any

import httpx
import orjson

from app.errors import FailureKind, GatewayError, RateLimited, UpstreamFailed

# Upstream headers a client may act on; everything else from the upstream stays here.
RATE_LIMIT_HEADERS = ("retry-after", "retry-after-ms")


def failed(error: GatewayError, kind: FailureKind) -> GatewayError:
    error.failure = kind
    return error


def credentials_rejected() -> GatewayError:
    return failed(
        UpstreamFailed(
            "The upstream rejected the gateway's credentials; operators have been told.",
            code="upstream_auth_failed",
        ),
        "auth",
    )


def quota_exhausted() -> GatewayError:
    return failed(
        UpstreamFailed(
            "The upstream account is out of credits or quota.", code="upstream_quota_exhausted"
        ),
        "quota",
    )


def rate_limited(message: str, response: httpx.Response) -> GatewayError:
    headers = {
        name: response.headers[name] for name in RATE_LIMIT_HEADERS if name in response.headers
    }
    return failed(
        RateLimited(f"The upstream is rate limiting: {message}", headers=headers), "rate_limited"
    )


def json_object(content: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
