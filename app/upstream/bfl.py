"""The Black Forest Labs dialect (FLUX.2, FLUX.1 Kontext): JSON submit, poll the task, download
the result.

What each model takes (endpoint, reference images, size mode, fields) is its catalog row's `bfl`
block, so a new BFL model is a config edit. One BFL task makes one image, so n images are n
tasks, run in parallel up to a bound. Polling and result URLs come from the upstream's answers
and go through the SSRF guard before any fetch. Transport failures and task statuses are
translated into gateway errors here, once; any failure after BFL accepted a task is `accepted`
(billed: never submitted again).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

import httpx
import orjson

from app.config.catalog import BflModel, Catalog, ModelRule
from app.config.yaml_source import ConfigError
from app.errors import (
    OUTCOME_UNKNOWN,
    FailureKind,
    GatewayError,
    InvalidRequest,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from app.intake.request import EditRequest, ParamValue
from app.observability.redaction import Redactor
from app.upstream.base import PartialSink, UpstreamAnswer, UpstreamKey
from app.upstream.bfl_size import size_fields
from app.upstream.failures import (
    after_acceptance,
    credentials_rejected,
    json_object,
    picked_headers,
    quota_exhausted,
    rate_limited,
    unparseable_redirect,
)
from app.upstream.url_guard import PinnedUrl, RefusedUrl, UrlGuard

if TYPE_CHECKING:
    # Only a type here: settings validation imports this module (check_catalog).
    from app.config.settings import UpstreamConfig

log = logging.getLogger("gateway.upstream.bfl")

_POOL_HEADERS = ("retry-after", "retry-after-ms", "x-ratelimit-reset", "x-ratelimit-remaining")
_MODERATED = ("Request Moderated", "Content Moderated")
# Result downloads retried on transport errors and 5xx: the task is paid for, the URL lasts ~10 min.
_DOWNLOAD_ATTEMPTS = 3
_IMAGE_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
)

Sleep = Callable[[float], Awaitable[None]]


class BflUpstream:
    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        client: httpx.AsyncClient,
        redactor: Redactor,
        *,
        guard: UrlGuard | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = name
        self._config = config
        self._bfl = config.bfl
        self._client = client
        self._redact = redactor
        self._guard = guard or UrlGuard.from_config(config.bfl)
        self._sleep = sleep
        self._base_url = config.base_url.rstrip("/")

    async def probe(self, key: UpstreamKey) -> bool:
        """`GET {base}/credits`: free; True once BFL accepts the key and the account has credits
        (a key disabled for 402 is only usable again after a top-up)."""
        headers = {"x-key": key.secret.get_secret_value(), "accept": "application/json"}
        timeout = httpx.Timeout(self._bfl.request_timeout, connect=self._config.timeouts.connect)
        try:
            response = await self._client.get(
                f"{self._base_url}/credits", headers=headers, timeout=timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL):  # InvalidURL: a 3xx Location httpx can't parse
            return False
        if response.status_code == 429:
            return True  # authenticated; its rate limit is the pool's business
        credits = (json_object(response.content) or {}).get("credits")
        return (
            response.status_code == 200
            and isinstance(credits, int | float)
            and not isinstance(credits, bool)
            and credits > 0
        )

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        # BFL makes no partial images: a streaming client gets keep-alives, then the result.
        rules = _rules(edit.model)
        sized = _check_request(edit, rules)
        if key is None:
            raise _failure(UpstreamFailed, f"The upstream {self.name!r} has no key to use.", "auth")
        payload = await asyncio.to_thread(_payload_json, edit, rules, sized)
        seed = _param(edit, "seed") if "seed" in rules.fields else None
        endpoint = rules.endpoint or edit.model.upstream_model
        total = edit.model.timeout or self._config.timeouts.total
        accepted: list[str] = []  # ids of this edit's tasks BFL accepted (and so billed)
        try:
            async with asyncio.timeout(total):
                images = await self._run_tasks(edit.n, endpoint, payload, seed, key, accepted)
        except TimeoutError:
            late = _failure(
                UpstreamTimeout, f"The upstream did not finish within {total:g} seconds.", "timeout"
            )
            raise (after_acceptance(late) if accepted else late) from None
        except GatewayError as error:
            if not accepted:
                raise
            # Paid for: no other key or upstream may submit this edit again.
            raise after_acceptance(error) from None
        encoded = await asyncio.to_thread(
            lambda: [base64.b64encode(image).decode("ascii") for image in images]
        )
        # Always bytes: a client asking for `url` gets one the gateway hosts (app/cache), never
        # BFL's own, which expires in about 10 minutes.
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": [{"b64_json": image} for image in encoded],
            "output_format": str(_param(edit, "output_format") or "png"),
        }
        return UpstreamAnswer(body=body, request_id=None)

    async def _run_tasks(
        self,
        n: int,
        endpoint: str,
        payload: bytes,
        seed: ParamValue | None,
        key: UpstreamKey,
        accepted: list[str],
    ) -> list[bytes]:
        bound = asyncio.Semaphore(self._bfl.max_parallel_tasks)

        async def one(index: int) -> bytes:
            # The same seed n times would make n identical images.
            task_seed = None if seed is None else (int(seed) + index) % 2**32
            async with bound:
                return await self._task(endpoint, payload, task_seed, key, accepted)

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(index)) for index in range(n)]
        except BaseExceptionGroup as errors:
            raise _first_gateway_error(errors) from None
        return [task.result() for task in tasks]

    async def _task(
        self, endpoint: str, payload: bytes, seed: int | None, key: UpstreamKey, accepted: list[str]
    ) -> bytes:
        deadline = asyncio.get_running_loop().time() + self._bfl.poll_deadline
        task_id, polling_url = await self._submit(endpoint, payload, seed, key)
        accepted.append(task_id)
        log.debug("bfl task %s submitted on %s", task_id, self.name)
        sample_url = await self._poll(task_id, polling_url, key, deadline)
        return await self._download(sample_url, deadline)

    async def _submit(
        self, endpoint: str, payload: bytes, seed: int | None, key: UpstreamKey
    ) -> tuple[str, str]:
        tail = b"}" if seed is None else b',"seed":' + str(seed).encode() + b"}"
        headers = {
            "x-key": key.secret.get_secret_value(),
            "content-type": "application/json",
            "content-length": str(len(payload) - 1 + len(tail)),
            "accept": "application/json",
        }
        timeouts = self._config.timeouts
        try:
            # One POST, never resent: after a read timeout the task may be running and billed.
            response = await self._client.post(
                f"{self._base_url}/{endpoint}",
                content=_chunks(memoryview(payload)[:-1], tail),
                headers=headers,
                timeout=httpx.Timeout(timeouts.total, connect=timeouts.connect),
            )
        except httpx.ConnectTimeout:
            raise self._unreachable("timed out connecting") from None
        except httpx.ConnectError:
            raise self._unreachable("refused the connection") from None
        except httpx.InvalidURL:
            raise unparseable_redirect() from None
        except httpx.TimeoutException:
            raise _failure(
                UpstreamTimeout, "The upstream did not accept the task in time.", "timeout"
            ) from None
        except httpx.TransportError as exc:
            raise _failure(
                UpstreamFailed,
                f"The connection to the upstream failed mid-request ({type(exc).__name__}).",
                "dropped",
                code="upstream_connection_lost",
            ) from None
        if response.status_code != 200:
            raise self._submit_error(response)
        body = json_object(response.content) or {}
        task_id, polling_url = body.get("id"), body.get("polling_url")
        if not isinstance(task_id, str) or not isinstance(polling_url, str):
            raise _bad_response("The upstream accepted the task without an id and polling URL.")
        return task_id, polling_url

    def _submit_error(self, response: httpx.Response) -> GatewayError:
        status = response.status_code
        message = self._redact(_error_message(response.content) or f"HTTP {status}")
        upstream_headers = picked_headers(response, _POOL_HEADERS)
        if status in (401, 403):
            return credentials_rejected(upstream_headers=upstream_headers)
        if status == 402:
            return quota_exhausted(upstream_headers=upstream_headers)
        if status == 429:
            return rate_limited(message, response, upstream_headers=upstream_headers)
        if 400 <= status < 500:
            # BFL answers 422 for a body it rejects; OpenAI clients expect 400 for that.
            return UpstreamRejected(
                400,
                f"The upstream rejected the request: {message}",
                error_type="invalid_request_error",
                param=None,
                code="upstream_rejected",
                upstream_headers=upstream_headers,
            )
        return UpstreamFailed(
            f"The upstream failed with HTTP {status}: {message}",
            failure="server",
            upstream_headers=upstream_headers,
        )

    async def _poll(self, task_id: str, polling_url: str, key: UpstreamKey, deadline: float) -> str:
        pinned = await self._pin(polling_url, "polling")
        if "id" not in pinned.url.params:
            pinned = dataclasses.replace(pinned, url=pinned.url.copy_merge_params({"id": task_id}))
        headers = {"x-key": key.secret.get_secret_value(), "accept": "application/json"}
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise _failure(
                    UpstreamTimeout,
                    f"The upstream task did not finish within {self._bfl.poll_deadline:g} seconds.",
                    "timeout",
                )
            await self._sleep(min(self._bfl.poll_interval, remaining))
            body = await self._poll_once(pinned, headers, deadline)
            if body is None:
                continue
            status = body.get("status")
            if status == "Ready":
                result = body.get("result")
                sample = result.get("sample") if isinstance(result, dict) else None
                if not isinstance(sample, str):
                    raise _bad_response("The upstream's finished task has no result image.")
                return sample
            if status in _MODERATED:
                raise UpstreamRejected(
                    400,
                    f"The upstream's moderation blocked this edit ({status}).",
                    error_type="invalid_request_error",
                    param=None,
                    code="moderation_blocked",
                )
            if status == "Error":
                raise _failure(
                    UpstreamFailed,
                    "The upstream task failed while generating the image.",
                    "server",
                    code="upstream_task_failed",
                )
            if status == "Task not found":
                raise _task_not_found()
            # Pending, and any in-progress status BFL adds later: keep polling.

    async def _poll_once(
        self, pinned: PinnedUrl, headers: dict[str, str], deadline: float
    ) -> dict[str, Any] | None:
        """The task's status body, or None for a transient failure worth polling again."""
        remaining = deadline - asyncio.get_running_loop().time()
        timeout = max(min(self._bfl.request_timeout, remaining), 0.001)
        try:
            response = await self._send(
                pinned,
                "polling",
                headers,
                httpx.Timeout(timeout, connect=self._config.timeouts.connect),
            )
            try:
                await response.aread()
            finally:
                await response.aclose()
        except httpx.TransportError as exc:
            # The task is paid for and running: a failed poll is retried until the deadline.
            log.info("bfl poll failed on %s (%s); polling again", self.name, type(exc).__name__)
            return None
        status = response.status_code
        if status == 429 or status >= 500:
            return None
        if status in (401, 403):
            raise _failure(
                UpstreamFailed,
                "The upstream rejected the gateway's credentials while polling.",
                "auth",
                code="upstream_auth_failed",
            )
        if status == 404:
            raise _task_not_found()
        body = json_object(response.content) if status == 200 else None
        if body is None:
            raise _bad_response(f"The upstream answered a poll with HTTP {status}.")
        return body

    async def _download(self, sample_url: str, deadline: float) -> bytes:
        pinned = await self._pin(sample_url, "result")
        for attempt in range(1, _DOWNLOAD_ATTEMPTS + 1):
            remaining = deadline - asyncio.get_running_loop().time()
            timeout = max(min(self._bfl.request_timeout, remaining), 0.001)
            try:
                data = await self._fetch_capped(pinned, timeout)
            except httpx.TransportError as exc:
                if attempt == _DOWNLOAD_ATTEMPTS:
                    raise _failure(
                        UpstreamFailed,
                        f"The upstream's result image could not be downloaded "
                        f"({type(exc).__name__}).",
                        "dropped",
                        code="upstream_result_unavailable",
                    ) from None
                continue
            if data is not None:
                return data
            if attempt == _DOWNLOAD_ATTEMPTS:
                break
        raise _failure(
            UpstreamFailed,
            "The upstream's result image could not be downloaded.",
            "server",
            code="upstream_result_unavailable",
        )

    async def _fetch_capped(self, pinned: PinnedUrl, seconds: float) -> bytes | None:
        """The image bytes; None for a 5xx worth retrying; an error for anything unusable."""
        cap = int(self._bfl.max_result_bytes)
        timeout = httpx.Timeout(seconds, connect=self._config.timeouts.connect)
        response = await self._send(pinned, "result", {"accept": "image/*"}, timeout)
        try:
            if response.status_code >= 500:
                return None
            if response.status_code != 200:
                raise _bad_response(
                    f"The upstream's result image answered HTTP {response.status_code}."
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise _too_large(cap)
            data = bytearray()
            # Counted after decoding, so a compressed body cannot inflate past the cap either.
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > cap:
                    raise _too_large(cap)
        finally:
            await response.aclose()
        if not any(data.startswith(magic) for magic, _ in _IMAGE_MAGIC) and not (
            data[:4] == b"RIFF" and data[8:12] == b"WEBP"
        ):
            raise _bad_response("The upstream's result is not a PNG, JPEG or WebP image.")
        return bytes(data)

    async def _pin(self, url: str, what: str) -> PinnedUrl:
        try:
            return await self._guard.check(url)
        except RefusedUrl as exc:
            raise self._refused(what, exc) from None

    async def _send(
        self, pinned: PinnedUrl, what: str, headers: dict[str, str], timeouts: httpx.Timeout
    ) -> httpx.Response:
        """A GET of a vetted URL; BFL's URLs are not followed through redirects (a 3xx is an
        unusable answer), but httpx still reads the Location, which the guard makes safe."""
        try:
            return await self._guard.send(self._client, pinned, headers=headers, timeouts=timeouts)
        except RefusedUrl as exc:
            raise self._refused(what, exc) from None

    def _refused(self, what: str, exc: RefusedUrl) -> GatewayError:
        log.warning("refused the %s URL from upstream %s: %s", what, self.name, exc)
        return _failure(
            UpstreamFailed,
            f"The upstream returned a {what} URL the gateway may not fetch: {exc}.",
            "bad_response",
            code="upstream_url_refused",
        )

    def _unreachable(self, what: str) -> GatewayError:
        return _failure(UpstreamUnreachable, f"The upstream {self.name!r} {what}.", "connect")


def check_catalog(catalog: Catalog, upstream: str) -> None:
    """Refuse catalog rules the BFL upstream `upstream` cannot honour, for the models it serves:
    what would otherwise fail only once paid for."""
    for model in catalog.models.values():
        if upstream not in model.upstreams:
            continue
        where = f"catalog: models.{model.name}"
        rules = model.bfl
        if rules is None:
            raise ConfigError(
                f"{where}.bfl: needed for the bfl upstream {upstream!r}: max_images, size "
                "(mode aspect_ratio or width_height) and the fields it takes"
            )
        if model.mask.allowed:
            raise ConfigError(
                f"{where}.mask.allowed: must be false, the bfl upstream {upstream!r} takes no mask"
            )
        if model.images.max_count > rules.max_images:
            raise ConfigError(
                f"{where}.images.max_count: at most bfl.max_images ({rules.max_images}) for "
                f"the bfl upstream {upstream!r}"
            )
        _check_size_rule(model, rules, where)


def _check_size_rule(model: ModelRule, rules: BflModel, where: str) -> None:
    """The sizes the model's params admit must be sizes its BFL size mode can send."""
    size = model.params.get("size")
    if size is None:
        return
    if rules.size.mode == "aspect_ratio":
        if "size" not in model.translate:
            raise ConfigError(
                f"{where}.translate.size: needed: bfl.size.mode aspect_ratio takes no size, so "
                "each size must map to an aspect_ratio"
            )
        return
    for value in size.values:
        try:
            size_fields(rules.size, value, None)
        except InvalidRequest:
            raise ConfigError(
                f"{where}.params.size: {value!r} is outside bfl.size (multiples of "
                f"{rules.size.multiple_of}, at least {rules.size.min_side}, at most "
                f"{rules.size.max_pixels} pixels)"
            ) from None
    custom = size.custom
    if custom is not None and (
        custom.multiple_of % rules.size.multiple_of or custom.max_pixels > rules.size.max_pixels
    ):
        raise ConfigError(
            f"{where}.params.size.custom: admits sizes outside bfl.size (multiples of "
            f"{rules.size.multiple_of}, at most {rules.size.max_pixels} pixels)"
        )


def _rules(model: ModelRule) -> BflModel:
    if model.bfl is None:
        # Settings validation refuses this at startup (check_catalog); a clear error regardless.
        raise InvalidRequest(
            f"{model.name} has no bfl rules in the catalog.",
            param="model",
            code="model_not_supported",
        )
    return model.bfl


def _check_request(edit: EditRequest, rules: BflModel) -> dict[str, ParamValue]:
    """What BFL cannot do, before anything is sent; the task body's size fields. The catalog
    rejects most of these earlier; this holds if its rules drift."""
    if edit.mask is not None:
        raise InvalidRequest(
            f"{edit.model.name} does not take a mask.", param="mask", code="unsupported_parameter"
        )
    if len(edit.images) > rules.max_images:
        raise InvalidRequest(
            f"{len(edit.images)} images were sent; {edit.model.name} accepts at most "
            f"{rules.max_images}.",
            param="image",
            code="too_many_images",
        )
    return size_fields(rules.size, edit.params.get("size"), edit.params.get("aspect_ratio"))


def _param(edit: EditRequest, name: str) -> ParamValue | None:
    """The client's value, else the model's configured default for the field."""
    if name in edit.params:
        return edit.params[name]
    rule = edit.model.params.get(name)
    return rule.default if rule is not None else None


def _payload_json(edit: EditRequest, rules: BflModel, sized: dict[str, ParamValue]) -> bytes:
    """The task body without its seed (added per task); base64 images, no data-URI prefix.
    Only the model's own fields are sent: BFL's schema also has webhook_url, and a client must
    not choose where BFL calls back."""
    payload: dict[str, Any] = {"prompt": edit.prompt}
    for index, image in enumerate(edit.images):
        payload[image_field(index)] = base64.b64encode(image.upload.read_all()).decode("ascii")
    payload.update(sized)
    for name in rules.fields:
        value = _param(edit, name)
        if value is not None and name != "seed":
            payload[name] = value
    return orjson.dumps(payload)


def image_field(index: int) -> str:
    """BFL's name for the reference image at `index`: input_image, input_image_2, ..."""
    return "input_image" if index == 0 else f"input_image_{index + 1}"


async def _chunks(*parts: bytes | memoryview) -> AsyncIterator[bytes]:
    for part in parts:
        # h11 writes memoryviews as they are; copying would duplicate every image once more.
        yield cast(bytes, part)


def _failure(
    error: type[GatewayError], message: str, kind: FailureKind, *, code: str | None = None
) -> GatewayError:
    """An upstream failure of `kind`. After one whose outcome is unknown the task may be
    running and billed: the SDK's own retries would pay for it again."""
    headers = {"x-should-retry": "false"} if kind in OUTCOME_UNKNOWN else None
    return error(message, code=code, headers=headers, failure=kind)


def _bad_response(message: str) -> GatewayError:
    return _failure(UpstreamFailed, message, "bad_response", code="upstream_bad_response")


def _too_large(cap: int) -> GatewayError:
    return _bad_response(f"The upstream's result image is larger than {cap} bytes.")


def _task_not_found() -> GatewayError:
    return _failure(
        UpstreamFailed,
        "The upstream lost track of the task.",
        "server",
        code="upstream_task_not_found",
    )


def _first_gateway_error(errors: BaseExceptionGroup[BaseException]) -> BaseException:
    for error in errors.exceptions:
        if isinstance(error, BaseExceptionGroup):
            return _first_gateway_error(error)
        if isinstance(error, GatewayError):
            return error
    return errors


def _error_message(content: bytes) -> str | None:
    body = json_object(content) or {}
    detail = body.get("detail")
    if isinstance(detail, str):
        return detail[:300]
    if isinstance(detail, list) and detail and isinstance(detail[0], dict):
        return str(detail[0].get("msg", ""))[:300] or None
    error = body.get("error") or body.get("message")
    return str(error)[:300] if error else None
