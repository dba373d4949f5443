"""The upstream failures every dialect reports the same way, built with their failure kind.

The failure kinds themselves, and which of them may have been billed, are defined beside
GatewayError (app/errors.py: FailureKind, OUTCOME_UNKNOWN, MAYBE_BILLED).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx
import orjson

from app.errors import (
    GatewayError,
    RateLimited,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnreachable,
)

# Upstream headers a client may act on; everything else from the upstream stays here.
RATE_LIMIT_HEADERS = ("retry-after", "retry-after-ms")


def picked_headers(response: httpx.Response, names: Iterable[str]) -> dict[str, str]:
    """The response's headers among `names` (the ones a dialect passes on, or the pool reads)."""
    return {name: response.headers[name] for name in names if name in response.headers}


def credentials_rejected(
    *,
    headers: Mapping[str, str] | None = None,
    upstream_headers: Mapping[str, str] | None = None,
) -> GatewayError:
    return UpstreamFailed(
        "The upstream rejected the gateway's credentials; operators have been told.",
        code="upstream_auth_failed",
        headers=headers,
        failure="auth",
        upstream_headers=upstream_headers,
    )


def quota_exhausted(
    *,
    headers: Mapping[str, str] | None = None,
    upstream_headers: Mapping[str, str] | None = None,
) -> GatewayError:
    return UpstreamFailed(
        "The upstream account is out of credits or quota.",
        code="upstream_quota_exhausted",
        headers=headers,
        failure="quota",
        upstream_headers=upstream_headers,
    )


def rate_limited(
    message: str,
    response: httpx.Response,
    *,
    headers: Mapping[str, str] | None = None,
    upstream_headers: Mapping[str, str] | None = None,
) -> GatewayError:
    return RateLimited(
        f"The upstream is rate limiting: {message}",
        headers={**picked_headers(response, RATE_LIMIT_HEADERS), **(headers or {})},
        failure="rate_limited",
        upstream_headers=upstream_headers,
    )


def after_acceptance(error: GatewayError) -> GatewayError:
    """`error`, raised after the upstream accepted a request it bills on submit (a BFL task):
    reported as `accepted`, which routing never sends again, and told to the SDK the same way.
    A rejection stays one: the upstream judged the request, and nothing retries that either."""
    if error.failure is None or error.failure == "rejected":
        return error
    return error.with_failure("accepted").with_headers({"x-should-retry": "false"})


def json_object(content: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def unparseable_redirect() -> GatewayError:
    """httpx builds the next request for every 3xx, followed or not, and a `Location` it cannot
    parse raises InvalidURL (no httpx.HTTPError) out of `send`. The upstream did answer: with a
    redirect no upstream call follows, the same failure as a 3xx with a usable `Location`."""
    return UpstreamFailed(
        "The upstream answered with a redirect whose Location cannot be parsed.", failure="server"
    )


@contextmanager
def transport_failures(upstream: str, total: float) -> Iterator[None]:
    """Translate what can go wrong on the way to an upstream that answers in one response (a
    deadline of `total` seconds, httpx's transport errors) into gateway errors, once. Only a
    failure before the request was written is `connect`; after that the call may be running, and
    billed, upstream."""
    try:
        yield
    except (TimeoutError, httpx.TimeoutException) as exc:
        if isinstance(exc, httpx.ConnectTimeout):
            raise UpstreamUnreachable(
                f"The upstream {upstream!r} timed out connecting.", failure="connect"
            ) from None
        raise UpstreamTimeout(
            f"The upstream did not answer within {total:g} seconds.", failure="timeout"
        ) from None
    except httpx.ConnectError:
        raise UpstreamUnreachable(
            f"The upstream {upstream!r} refused the connection.", failure="connect"
        ) from None
    except httpx.InvalidURL:
        raise unparseable_redirect() from None
    except httpx.TransportError as exc:
        raise UpstreamFailed(
            f"The connection to the upstream failed mid-request ({type(exc).__name__}).",
            code="upstream_connection_lost",
            failure="dropped",
        ) from None
