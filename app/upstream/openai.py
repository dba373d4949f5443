"""The OpenAI-compatible dialect (OpenAI itself and resellers): multipart POST {base}/images/edits,
JSON POST {base}/images/generations; with `stream`, the upstream's SSE is read as it arrives and
its partial images handed to the caller's `on_partial` at once, the completed event kept as the
answer.

Transport failures and upstream statuses are translated into gateway errors here, once. Where a
call goes and how it authenticates is a `WireTarget`, so a provider speaking the same wire format
on other paths (Azure OpenAI, app/upstream/azure.py) composes this dialect instead of copying it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any, Literal, Protocol

import httpx
import orjson

from app.config.settings import UpstreamConfig
from app.errors import GatewayError, UpstreamFailed, UpstreamRejected
from app.intake.request import EditRequest
from app.observability.redaction import Redactor
from app.upstream.base import PartialSink, UpstreamAnswer, UpstreamKey
from app.upstream.failures import (
    credentials_rejected,
    json_object,
    picked_headers,
    quota_exhausted,
    rate_limited,
    transport_failures,
)
from app.upstream.multipart_body import openai_edit_body

_PROBE_TIMEOUT = 10.0
# What the key pool reads to time a cooldown.
_POOL_HEADERS = (
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-reset-requests",
    "x-ratelimit-remaining-requests",
)
# One SSE event (a partial or final image as base64) may not grow past this.
MAX_EVENT_BYTES = 96 * 1024 * 1024


# The three calls of the images API a dialect of this wire format makes.
Call = Literal["images/edits", "images/generations", "models"]


class WireTarget(Protocol):
    """Where each call goes and how a key is presented."""

    def url(self, call: Call, model: str) -> str: ...

    def auth_headers(self, key: UpstreamKey) -> dict[str, str]: ...


class OpenAITarget:
    """OpenAI and resellers: `{base}/images/edits`, `Authorization: Bearer <key>`."""

    def __init__(self, base_url: str) -> None:
        self._base = base_url.rstrip("/")

    def url(self, call: Call, model: str) -> str:
        return f"{self._base}/{call}"

    def auth_headers(self, key: UpstreamKey) -> dict[str, str]:
        return {"authorization": f"Bearer {key.secret.get_secret_value()}"}


# The `code` an upstream 4xx is answered with instead of its own, given the upstream's `error`
# object (None keeps the upstream's): how a provider's own refusals become OpenAI's codes.
RejectionCode = Callable[[dict[str, Any]], str | None]


class OpenAIUpstream:
    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        client: httpx.AsyncClient,
        redactor: Redactor,
        *,
        target: WireTarget | None = None,
        rejection_code: RejectionCode | None = None,
    ) -> None:
        self.name = name
        self._config = config
        self._client = client
        self._redact = redactor
        self._target = target or OpenAITarget(config.base_url)
        self._rejection_code = rejection_code

    async def probe(self, key: UpstreamKey) -> bool:
        """`GET {base}/models`: free, and it fails with 401/403 for a key that is still bad."""
        headers = {**self._target.auth_headers(key), "accept": "application/json"}
        timeout = httpx.Timeout(_PROBE_TIMEOUT, connect=self._config.timeouts.connect)
        try:
            response = await self._client.get(
                self._target.url("models", ""), headers=headers, timeout=timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL):  # InvalidURL: a 3xx Location httpx can't parse
            return False
        # 429 means the key authenticated; its rate limit is the pool's business, not the probe's.
        return response.status_code in (200, 429)

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        """An edit or a generation (by `edit.operation`), streamed when the client streams and
        the model's upstream can."""
        streaming = edit.stream and "stream" in edit.model.params
        total = edit.model.timeout or self._config.timeouts.total
        request = self._request(edit, key, streaming, total)
        with transport_failures(self.name, total):
            async with asyncio.timeout(total):
                if streaming:
                    return await self._streamed(request, on_partial)
                response = await self._client.send(request)
        return self._interpret(response)

    def _request(
        self, edit: EditRequest, key: UpstreamKey | None, streaming: bool, total: float
    ) -> httpx.Request:
        if streaming:
            edit = replace(
                edit,
                params={**edit.params, "stream": True, "partial_images": edit.partial_images},
            )
        headers = {"accept": "text/event-stream" if streaming else "application/json"}
        if key is not None:
            headers.update(self._target.auth_headers(key))
        timeout = httpx.Timeout(total, connect=self._config.timeouts.connect)
        model = edit.model.upstream_model
        if edit.operation == "generation":
            payload: dict[str, Any] = {"model": model, "prompt": edit.prompt}
            payload.update(edit.params)
            payload.update(dict(edit.extra_fields))
            return self._client.build_request(
                "POST",
                self._target.url("images/generations", model),
                content=orjson.dumps(payload),
                headers={**headers, "content-type": "application/json"},
                timeout=timeout,
            )
        body = openai_edit_body(edit)
        headers["content-type"] = body.content_type
        headers["content-length"] = str(body.length)
        return self._client.build_request(
            "POST",
            self._target.url("images/edits", model),
            content=body.stream(),
            headers=headers,
            timeout=timeout,
        )

    async def _streamed(
        self, request: httpx.Request, on_partial: PartialSink | None
    ) -> UpstreamAnswer:
        response = await self._client.send(request, stream=True)
        try:
            content_type = response.headers.get("content-type", "")
            if response.status_code != 200 or "text/event-stream" not in content_type:
                # An error, or an upstream that ignored `stream`: one JSON body either way.
                await response.aread()
                return self._interpret(response)
            return await self._read_events(response, on_partial)
        finally:
            await response.aclose()

    async def _read_events(
        self, response: httpx.Response, on_partial: PartialSink | None
    ) -> UpstreamAnswer:
        request_id = response.headers.get("x-request-id")
        completed: list[dict[str, Any]] = []
        relayed = 0
        async for event in _sse_events(response):
            error = event.get("error")
            if error is not None:
                detail = error if isinstance(error, dict) else {"message": str(error)}
                message = self._redact(str(detail.get("message") or "stream error")[:500])
                # After a partial image the client has seen progress: never resent silently.
                raise UpstreamFailed(
                    f"The upstream failed mid-stream: {message}",
                    code="upstream_stream_error",
                    failure="dropped" if relayed else "server",
                )
            kind = str(event.get("type", ""))
            if kind.endswith(".partial_image"):
                if on_partial is not None:
                    on_partial(event)
                relayed += 1
            elif kind.endswith(".completed"):
                completed.append(event)
        if not completed:
            raise UpstreamFailed(
                "The upstream's stream ended before its completed event.",
                code="upstream_connection_lost",
                failure="dropped",
            )
        return UpstreamAnswer(body=_images_response(completed), request_id=request_id)

    def _interpret(self, response: httpx.Response) -> UpstreamAnswer:
        request_id = response.headers.get("x-request-id")
        if response.status_code == 200:
            body = json_object(response.content)
            if body is None or not isinstance(body.get("data"), list):
                raise UpstreamFailed(
                    "The upstream answered 200 with a body that is not an ImagesResponse.",
                    code="upstream_bad_response",
                    failure="bad_response",
                )
            return UpstreamAnswer(body=body, request_id=request_id)
        # The client quotes this id to support; the upstream's is the one that helps.
        headers = {"x-request-id": request_id} if request_id else {}
        raise self._error(response, headers, picked_headers(response, _POOL_HEADERS))

    def _optional(self, value: object) -> str | None:
        return None if value is None else self._redact(str(value)[:200])

    def _error(
        self, response: httpx.Response, headers: dict[str, str], upstream_headers: dict[str, str]
    ) -> GatewayError:
        """The failure an error status stands for; `headers` go to the client, and
        `upstream_headers` to the key pool."""
        status = response.status_code
        detail = _error_detail(response.content)
        message = self._redact(str(detail.get("message") or f"HTTP {status}"))
        code = detail.get("code")
        if 400 <= status < 500 and self._rejection_code is not None:
            code = self._rejection_code(detail) or code
        if status in (401, 403):
            return credentials_rejected(headers=headers, upstream_headers=upstream_headers)
        if status == 402 or code == "insufficient_quota":
            return quota_exhausted(headers=headers, upstream_headers=upstream_headers)
        if status == 429:
            return rate_limited(
                message, response, headers=headers, upstream_headers=upstream_headers
            )
        if 400 <= status < 500:
            return UpstreamRejected(
                status,
                message,
                error_type=self._redact(str(detail.get("type") or "invalid_request_error")),
                param=self._optional(detail.get("param")),
                code=self._optional(code),
                headers=headers,
                upstream_headers=upstream_headers,
            )
        return UpstreamFailed(
            f"The upstream failed with HTTP {status}: {message}",
            headers=headers,
            failure="server",
            upstream_headers=upstream_headers,
        )


async def _sse_events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """Each event's JSON data, as the lines arrive (comments and [DONE] skipped)."""
    data: list[str] = []
    size = 0
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            piece = line[5:].removeprefix(" ")
            size += len(piece)
            if size > MAX_EVENT_BYTES:
                raise UpstreamFailed(
                    "The upstream sent a stream event larger than the gateway accepts.",
                    code="upstream_bad_response",
                    failure="bad_response",
                )
            data.append(piece)
        elif line == "" and data:
            text = "\n".join(data)
            data, size = [], 0
            if text.strip() == "[DONE]":
                continue
            event = json_object(text.encode())
            if event is None:
                raise UpstreamFailed(
                    "The upstream sent a stream event that is not a JSON object.",
                    code="upstream_bad_response",
                    failure="bad_response",
                )
            yield event


def _images_response(completed: list[dict[str, Any]]) -> dict[str, Any]:
    """The completed events as the ImagesResponse a non-streaming call would have answered."""
    first = completed[0]
    body: dict[str, Any] = {
        "created": first.get("created_at")
        if isinstance(first.get("created_at"), int)
        else int(time.time()),
        "data": [{"b64_json": event.get("b64_json", "")} for event in completed],
    }
    for name in ("background", "output_format", "quality", "size", "usage"):
        if name in first:
            body[name] = first[name]
    return body


def _error_detail(content: bytes) -> dict[str, Any]:
    body = json_object(content) or {}
    error = body.get("error")
    if isinstance(error, dict):
        return error
    if isinstance(error, str):
        return {"message": error}
    return {}
