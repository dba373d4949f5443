"""The OpenAI-compatible dialect (OpenAI itself and resellers): multipart POST {base}/images/edits.

Transport failures and upstream statuses are translated into gateway errors here, once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson

from app.config import UpstreamConfig
from app.edit import EditRequest
from app.errors import (
    FailureKind,
    GatewayError,
    RateLimited,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.redaction import Redactor
from app.upstream.base import UpstreamAnswer, UpstreamKey
from app.upstream.multipart_body import openai_edit_body

# Upstream headers a client may act on; everything else from the upstream stays here.
_RATE_LIMIT_HEADERS = ("retry-after", "retry-after-ms")
# What the key pool reads to time a cooldown.
_POOL_HEADERS = (
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-requests",
)


class OpenAIUpstream:
    def __init__(
        self, name: str, config: UpstreamConfig, client: httpx.AsyncClient, redactor: Redactor
    ) -> None:
        self.name = name
        self._config = config
        self._client = client
        self._redact = redactor
        self._edits_url = config.base_url.rstrip("/") + "/images/edits"

    async def edit(self, edit: EditRequest, key: UpstreamKey | None) -> UpstreamAnswer:
        body = openai_edit_body(edit)
        headers = {
            "content-type": body.content_type,
            "content-length": str(body.length),
            "accept": "application/json",
        }
        if key is not None:
            headers["authorization"] = f"Bearer {key.secret.get_secret_value()}"
        total = edit.model.timeout or self._config.timeouts.total
        timeout = httpx.Timeout(total, connect=self._config.timeouts.connect)
        try:
            async with asyncio.timeout(total):
                response = await self._client.post(
                    self._edits_url, content=body.stream(), headers=headers, timeout=timeout
                )
        except (TimeoutError, httpx.TimeoutException) as exc:
            if isinstance(exc, httpx.ConnectTimeout):
                raise self._unreachable("timed out connecting") from None
            raise _failed(
                UpstreamTimeout(f"The upstream did not answer within {total:g} seconds."),
                "timeout",
            ) from None
        except httpx.ConnectError:
            raise self._unreachable("refused the connection") from None
        except httpx.TransportError as exc:
            # The request may have been delivered and may be running (and billed) upstream.
            raise _failed(
                UpstreamFailed(
                    f"The connection to the upstream failed mid-request ({type(exc).__name__}).",
                    code="upstream_connection_lost",
                ),
                "dropped",
            ) from None
        return self._interpret(response)

    def _unreachable(self, what: str) -> GatewayError:
        return _failed(UpstreamUnreachable(f"The upstream {self.name!r} {what}."), "connect")

    def _interpret(self, response: httpx.Response) -> UpstreamAnswer:
        request_id = response.headers.get("x-request-id")
        if response.status_code == 200:
            body = _json_object(response.content)
            if body is None or not isinstance(body.get("data"), list):
                raise _failed(
                    UpstreamFailed(
                        "The upstream answered 200 with a body that is not an ImagesResponse.",
                        code="upstream_bad_response",
                    ),
                    "bad_response",
                )
            return UpstreamAnswer(body=body, request_id=request_id)
        error = self._error(response)
        error.upstream_headers = {
            name: response.headers[name] for name in _POOL_HEADERS if name in response.headers
        }
        if request_id:
            # The client quotes this id to support; the upstream's is the one that helps.
            error.headers["x-request-id"] = request_id
        raise error

    def _optional(self, value: object) -> str | None:
        return None if value is None else self._redact(str(value)[:200])

    def _error(self, response: httpx.Response) -> GatewayError:
        status = response.status_code
        detail = _error_detail(response.content)
        message = self._redact(str(detail.get("message") or f"HTTP {status}"))
        code = detail.get("code")
        if status in (401, 403):
            return _failed(
                UpstreamFailed(
                    "The upstream rejected the gateway's credentials; operators have been told.",
                    code="upstream_auth_failed",
                ),
                "auth",
            )
        if status == 402 or code == "insufficient_quota":
            return _failed(
                UpstreamFailed(
                    "The upstream account is out of credits or quota.",
                    code="upstream_quota_exhausted",
                ),
                "quota",
            )
        if status == 429:
            headers = {
                name: response.headers[name]
                for name in _RATE_LIMIT_HEADERS
                if name in response.headers
            }
            return _failed(
                RateLimited(f"The upstream is rate limiting: {message}", headers=headers),
                "rate_limited",
            )
        if 400 <= status < 500:
            rejected = UpstreamRejected(
                status,
                message,
                error_type=self._redact(str(detail.get("type") or "invalid_request_error")),
                param=self._optional(detail.get("param")),
                code=self._optional(code),
            )
            return _failed(rejected, "rejected")
        return _failed(
            UpstreamFailed(f"The upstream failed with HTTP {status}: {message}"), "server"
        )


def _failed(error: GatewayError, kind: FailureKind) -> GatewayError:
    error.failure = kind
    return error


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        value = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _error_detail(content: bytes) -> dict[str, Any]:
    body = _json_object(content) or {}
    error = body.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return {}
