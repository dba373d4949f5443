"""The Google Gemini dialect (Gemini's native image models): an edit or a generation becomes
`POST {base}/{api_version}/models/{model}:generateContent`, JSON, the key in `x-goog-api-key`: the
prompt and the images as inline parts, the aspect ratio and image size in
`generationConfig.imageConfig`. The answer's inline image comes back as `b64_json`, its
`usageMetadata` as OpenAI's usage; a blocked prompt or an answer without an image is 400
`moderation_blocked`.

One call makes one image (Gemini's image models take no candidateCount above 1), so n images are
n calls, run in parallel up to a bound. Transport failures and Gemini's error statuses are
translated into gateway errors here, once.
"""

from __future__ import annotations

import asyncio
import base64
import math
import re
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx
import orjson

from app.config.catalog import Catalog
from app.config.yaml_source import ConfigError
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

if TYPE_CHECKING:
    # Only a type here: settings validation imports this module (check_catalog).
    from app.config.settings import UpstreamConfig

_PROBE_TIMEOUT = 10.0
# Finish reasons (google.genai types.FinishReason) that mean the safety system stopped the image.
SAFETY_FINISH_REASONS = frozenset(
    {
        "SAFETY",
        "IMAGE_SAFETY",
        "PROHIBITED_CONTENT",
        "IMAGE_PROHIBITED_CONTENT",
        "BLOCKLIST",
        "SPII",
    }
)
_RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
_ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
# google.protobuf.Duration in JSON: seconds with up to nine decimals and an `s`.
_DURATION = re.compile(r"^(\d{1,9}(?:\.\d{1,9})?)s$")
_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp"}


class GeminiUpstream:
    def __init__(
        self, name: str, config: UpstreamConfig, client: httpx.AsyncClient, redactor: Redactor
    ) -> None:
        self.name = name
        self._config = config
        self._settings = config.gemini
        self._client = client
        self._redact = redactor
        self._base = f"{config.base_url.rstrip('/')}/{config.gemini.api_version}"

    def url(self, model: str) -> str:
        return f"{self._base}/models/{quote(model, safe='')}:generateContent"

    async def probe(self, key: UpstreamKey) -> bool:
        """`GET {base}/{api_version}/models`: free; 400 (API_KEY_INVALID) or 403 for a bad key."""
        headers = {"x-goog-api-key": key.secret.get_secret_value(), "accept": "application/json"}
        timeout = httpx.Timeout(_PROBE_TIMEOUT, connect=self._config.timeouts.connect)
        try:
            response = await self._client.get(
                f"{self._base}/models", params={"pageSize": 1}, headers=headers, timeout=timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL):  # InvalidURL: a 3xx Location httpx can't parse
            return False
        return response.status_code in (200, 429)

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        # Gemini makes no partial images: a streaming client gets keep-alives, then the result.
        if key is None:
            raise UpstreamFailed(f"The upstream {self.name!r} has no key to use.", failure="auth")
        body = await asyncio.to_thread(request_body, edit, self._settings.response_modalities)
        total = edit.model.timeout or self._config.timeouts.total
        with transport_failures(self.name, total):
            async with asyncio.timeout(total):
                answers = await self._calls(self.url(edit.model.upstream_model), body, key, edit.n)
        return UpstreamAnswer(body=images_response(answers), request_id=None)

    async def _calls(self, url: str, body: bytes, key: UpstreamKey, n: int) -> list[dict[str, Any]]:
        if n == 1:
            return [await self._call(url, body, key)]
        bound = asyncio.Semaphore(self._settings.max_parallel_calls)

        async def one() -> dict[str, Any]:
            async with bound:
                return await self._call(url, body, key)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one()) for _ in range(n)]
        except BaseExceptionGroup as errors:
            raise _first_gateway_error(errors) from None
        return [task.result() for task in tasks]

    async def _call(self, url: str, body: bytes, key: UpstreamKey) -> dict[str, Any]:
        headers = {
            "x-goog-api-key": key.secret.get_secret_value(),
            "content-type": "application/json",
            "accept": "application/json",
        }
        timeouts = self._config.timeouts
        total = timeouts.total
        with transport_failures(self.name, total):
            response = await self._client.post(
                url,
                content=body,
                headers=headers,
                timeout=httpx.Timeout(total, connect=timeouts.connect),
            )
        if response.status_code != 200:
            raise self._error(response)
        answer = json_object(response.content)
        if answer is None:
            raise UpstreamFailed(
                "The upstream answered 200 with a body that is not a JSON object.",
                code="upstream_bad_response",
                failure="bad_response",
            )
        return answer

    def _error(self, response: httpx.Response) -> GatewayError:
        """The failure a Gemini error status stands for (its `error.status` is gRPC's name)."""
        status = response.status_code
        error = (json_object(response.content) or {}).get("error")
        error = error if isinstance(error, dict) else {}
        message = self._redact(str(error.get("message") or f"HTTP {status}")[:500])
        grpc_status = str(error.get("status") or "")
        details = error.get("details")
        details = (
            [item for item in details if isinstance(item, dict)]
            if isinstance(details, list)
            else []
        )
        upstream_headers = picked_headers(response, ("retry-after",))
        delay = retry_delay(details)
        if delay is not None:
            # RetryInfo is how Gemini says when to come back; the key pool reads retry-after.
            upstream_headers["retry-after"] = f"{delay:g}"
        if status in (401, 403) or _error_reason(details) == "API_KEY_INVALID":
            return credentials_rejected(upstream_headers=upstream_headers)
        if status == 429:
            hint = {} if delay is None else {"retry-after": str(math.ceil(delay))}
            return rate_limited(message, response, headers=hint, upstream_headers=upstream_headers)
        if grpc_status == "FAILED_PRECONDITION":
            # Billing not enabled, or the free tier unavailable where the key's project is.
            return quota_exhausted(upstream_headers=upstream_headers)
        if 400 <= status < 500:
            return UpstreamRejected(
                status,
                f"The upstream rejected the request: {message}",
                error_type="invalid_request_error",
                param=None,
                code=grpc_status.lower() or "upstream_rejected",
                upstream_headers=upstream_headers,
            )
        return UpstreamFailed(
            f"The upstream failed with HTTP {status}: {message}",
            failure="server",
            upstream_headers=upstream_headers,
        )


def request_body(edit: EditRequest, modalities: tuple[str, ...]) -> bytes:
    """The generateContent body: the prompt, then each image as an inline part (base64, with its
    sniffed MIME type), and the image settings the catalog let through."""
    parts: list[dict[str, Any]] = [{"text": edit.prompt}]
    for image in edit.images:
        data = base64.b64encode(image.upload.read_all()).decode("ascii")
        parts.append({"inline_data": {"mime_type": image.info.mime_type, "data": data}})
    generation: dict[str, Any] = {"responseModalities": list(modalities)}
    image_config: dict[str, str] = {}
    for param, field in (("aspect_ratio", "aspectRatio"), ("image_size", "imageSize")):
        value = edit.params.get(param)
        if isinstance(value, str) and value:
            image_config[field] = value
    if image_config:
        generation["imageConfig"] = image_config
    return orjson.dumps(
        {"contents": [{"role": "user", "parts": parts}], "generationConfig": generation}
    )


def images_response(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One image per answer, as OpenAI's ImagesResponse (b64_json), with the usage of all."""
    images = [answer_image(answer) for answer in answers]
    body: dict[str, Any] = {
        "created": int(time.time()),
        "data": [{"b64_json": data} for data, _ in images],
        "output_format": _FORMATS.get(images[0][1], "png"),
    }
    usage = usage_of([answer.get("usageMetadata") for answer in answers])
    if usage is not None:
        body["usage"] = usage
    return body


def answer_image(answer: dict[str, Any]) -> tuple[str, str]:
    """The first final image of the answer (base64, MIME type); a block or no image is 400."""
    feedback = answer.get("promptFeedback")
    if isinstance(feedback, dict) and feedback.get("blockReason"):
        raise _moderated(f"the prompt was blocked ({_word(feedback['blockReason'])})")
    reasons: list[str] = []
    for candidate in _dicts(answer.get("candidates")):
        content = candidate.get("content")
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in _dicts(parts):
            if part.get("thought") is True:
                continue  # an interim image the model drew while thinking, not its answer
            inline = part.get("inlineData", part.get("inline_data"))
            if not isinstance(inline, dict):
                continue
            data = inline.get("data")
            mime = inline.get("mimeType", inline.get("mime_type"))
            if isinstance(data, str) and data and isinstance(mime, str) and mime in _FORMATS:
                return data, mime
        reasons.append(_word(candidate.get("finishReason")))
    blocked = [reason for reason in reasons if reason in SAFETY_FINISH_REASONS]
    if blocked:
        raise _moderated(f"the image was blocked ({blocked[0]})")
    # Gemini answers with text and no image when it declines to draw: a refusal, billed, and no
    # other key would answer differently.
    reason = reasons[0] if reasons else "no candidates"
    raise _moderated(f"the upstream answered without an image ({reason})")


def usage_of(metadata: list[Any]) -> dict[str, Any] | None:
    """Gemini's usageMetadata of every call, summed into OpenAI's usage shape. Thinking tokens
    are billed as output, so they count as output."""
    found = [meta for meta in metadata if isinstance(meta, dict)]
    if not found:
        return None
    totals = {"input": 0, "output": 0, "total": 0}
    details = {"in_text": 0, "in_image": 0, "out_text": 0, "out_image": 0}
    for meta in found:
        prompt = _count(meta.get("promptTokenCount"))
        output = _count(meta.get("candidatesTokenCount")) + _count(meta.get("thoughtsTokenCount"))
        totals["input"] += prompt
        totals["output"] += output
        totals["total"] += _count(meta.get("totalTokenCount")) or prompt + output
        for side, name in (("in", "promptTokensDetails"), ("out", "candidatesTokensDetails")):
            for item in _dicts(meta.get(name)):
                modality = str(item.get("modality", "")).lower()
                if modality in ("text", "image"):
                    details[f"{side}_{modality}"] += _count(item.get("tokenCount"))
    return {
        "input_tokens": totals["input"],
        "output_tokens": totals["output"],
        "total_tokens": totals["total"],
        "input_tokens_details": {
            "text_tokens": details["in_text"],
            "image_tokens": details["in_image"],
        },
        "output_tokens_details": {
            "text_tokens": details["out_text"],
            "image_tokens": details["out_image"],
        },
    }


def retry_delay(details: list[dict[str, Any]]) -> float | None:
    """Seconds from a google.rpc.RetryInfo detail (`"retryDelay": "31s"`), if there is one."""
    for item in details:
        if item.get("@type") == _RETRY_INFO:
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def check_catalog(catalog: Catalog, upstream: str) -> None:
    """Gemini's image models take no mask: a model served by a gemini upstream must not accept
    one, or the mask would be paid for and ignored."""
    for model in catalog.models.values():
        if upstream in model.upstreams and model.mask.allowed:
            raise ConfigError(
                f"models.{model.name}.mask.allowed: upstream {upstream!r} is a gemini upstream, "
                "which takes no mask; set `mask: {allowed: false}`"
            )


def _error_reason(details: list[dict[str, Any]]) -> str | None:
    for item in details:
        if item.get("@type") == _ERROR_INFO and isinstance(item.get("reason"), str):
            return str(item["reason"])
    return None


def _moderated(why: str) -> GatewayError:
    return UpstreamRejected(
        400,
        f"The upstream's safety system refused the request: {why}.",
        error_type="invalid_request_error",
        param=None,
        code="moderation_blocked",
    )


def _first_gateway_error(errors: BaseExceptionGroup[BaseException]) -> BaseException:
    for error in errors.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_gateway_error(error)
        if isinstance(error, GatewayError):
            return error
    return errors


def _dicts(value: object) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _word(value: object) -> str:
    # Upstream text in our messages: bounded, and only an enum-like word.
    text = str(value or "unspecified")[:40]
    return text if re.fullmatch(r"[A-Za-z_]+", text) else "unspecified"
