"""One edit or generation, from a parsed HTTP request to its answer: the client's limits ->
intake (multipart or JSON) -> validation -> the client's model permission and image charge ->
cache (-> forwarding) -> an ImagesResponse, or server-sent events when the client streams.

The route hands over what the HTTP request says (an ImageCall) and turns the answer into a
response; nothing here knows about routes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.types import Receive

from app.cache.service import EditCache, EditOutcome, Policy, response_format_of
from app.config.catalog import Catalog
from app.config.settings import Settings
from app.errors import GatewayError, UpstreamTimeout
from app.intake.form import IntakeForm, read_form
from app.intake.json_body import JsonEditReader, is_json, read_json_object, text_fields
from app.intake.request import EditRequest
from app.intake.spool import SpoolWorker
from app.intake.validation import validate_edit, validate_generation
from app.observability.record import RequestRecord
from app.service.client_wait import GRACE_SECONDS, while_client_waits
from app.service.streaming import event_stream, prepend
from app.tenants.directory import ClientPolicy
from app.tenants.gate import ClientGate, MeteredEdit
from app.upstream.base import PartialSink
from app.upstream.fetch import ImageFetcher
from app.upstream.images_response import spent_nothing


@dataclass(frozen=True, slots=True)
class ImageCall:
    """What the HTTP request says about one call, as the route parsed it."""

    request_id: str
    client: ClientPolicy
    body: AsyncIterator[bytes]  # the request body as it streams in
    content_type: str | None
    content_length: str | None
    cache_policy: Policy
    client_scope: str  # the digest of the key the client presented (never the key)
    read_timeout: float | None  # the client's own read timeout, if it sent one
    base_url: str  # the request's own base URL, for file URLs when public_base_url is unset
    receive: Receive  # the connection, read to notice the client leaving
    record: RequestRecord  # what the request did, for its log line and metrics


@dataclass(frozen=True, slots=True)
class JsonAnswer:
    body: dict[str, Any]  # an ImagesResponse
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    events: AsyncIterator[bytes]  # the SSE body, its first event already produced
    headers: dict[str, str]
    # Frees what the stream holds (the client's concurrency slot); runs once however it ends.
    close: Callable[[], Awaitable[None]]


Answer = JsonAnswer | StreamAnswer
# Reads and validates one request: the form (it owns the uploads) and what it asks for.
Reader = Callable[[ImageCall], Awaitable[tuple[IntakeForm, EditRequest]]]


class ImageService:
    def __init__(
        self,
        settings: Settings,
        *,
        cache: EditCache,
        gate: ClientGate,
        redact: Callable[[str], str],
        spool_worker: SpoolWorker | None,
        image_urls: ImageFetcher | None,
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._gate = gate
        self._redact = redact
        self._spool_worker = spool_worker
        self._image_urls = image_urls

    async def edit(self, call: ImageCall) -> Answer:
        """POST /v1/images/edits. Raises ClientDisconnect when the client leaves first."""
        return await self._serve(call, self._read_edit)

    async def generate(self, call: ImageCall) -> Answer:
        """POST /v1/images/generations. Raises ClientDisconnect when the client leaves first."""
        return await self._serve(call, self._read_generation)

    async def _serve(self, call: ImageCall, read: Reader) -> Answer:
        # The client's requests/min and concurrency are checked before the body is read; a
        # streamed answer holds its slot until its last event.
        held = AsyncExitStack()
        metered = await held.enter_async_context(self._gate.enter(call.client, call.request_id))
        try:
            form, edit = await read(call)
            try:
                # 403 for a model this client may not use; then images/min and quotas are
                # charged (given back below for a cache hit, or when the upstream makes nothing).
                await metered.charge(edit)
            except BaseException:
                form.close()
                raise
            if edit.stream:
                owned = held.pop_all()  # the stream releases the slot once it ends
                stream = event_stream(
                    edit,
                    partial(self._body, call, metered, form, edit),
                    redact=self._redact,
                    finish=owned.aclose,
                    raise_before_events=True,
                )
                # The first event (or keep-alive) decides the status: a failure before it is an
                # ordinary error response, with its status and retry headers.
                first = await anext(stream)
                return StreamAnswer(
                    events=prepend(first, stream),
                    headers={"cache-control": "no-cache", **metered.headers},
                    close=owned.aclose,
                )
            outcome, body = await self._answer(
                call, metered, form, edit, response_format_of(edit), on_partial=None
            )
            headers = {"x-cache": outcome.x_cache, "age": str(outcome.age), **metered.headers}
            if outcome.upstream_request_id:
                headers["x-request-id"] = outcome.upstream_request_id
            return JsonAnswer(body=body, headers=headers)
        finally:
            await held.aclose()

    async def _read_edit(self, call: ImageCall) -> tuple[IntakeForm, EditRequest]:
        settings = self._settings
        max_file_bytes = min(int(settings.limits.max_file_bytes), settings.catalog.max_image_bytes)
        hash_uploads = self._cache.needs_fingerprint(call.cache_policy)
        if is_json(call.content_type):
            body = await read_json_object(
                call.body, content_type=call.content_type, limits=settings.limits
            )
            reader = JsonEditReader(
                settings.limits,
                max_file_bytes=max_file_bytes,
                fetch_url=self._image_urls,
                worker=self._spool_worker,
                hash_uploads=hash_uploads,
            )
            form = await reader.form(body)
        else:
            form = await read_form(
                call.body,
                content_type=call.content_type,
                content_length=call.content_length,
                limits=settings.limits,
                max_file_bytes=max_file_bytes,
                worker=self._spool_worker,
                hash_uploads=hash_uploads,
            )
        _note_form(call.record, form, settings.catalog, settings.default_model)
        try:
            edit = validate_edit(
                form,
                settings.catalog,
                default_model=settings.default_model,
                max_pixels=settings.limits.max_pixels,
            )
        except BaseException:
            form.close()
            raise
        _note_request(call.record, edit, settings.logging.log_prompts)
        return form, edit

    async def _read_generation(self, call: ImageCall) -> tuple[IntakeForm, EditRequest]:
        settings = self._settings
        body = await read_json_object(
            call.body, content_type=call.content_type, limits=settings.limits
        )
        form = IntakeForm(fields=text_fields(body))
        _note_form(call.record, form, settings.catalog, settings.default_model)
        edit = validate_generation(form, settings.catalog, default_model=settings.default_model)
        _note_request(call.record, edit, settings.logging.log_prompts)
        return form, edit

    async def _answer(
        self,
        call: ImageCall,
        metered: MeteredEdit,
        form: IntakeForm,
        edit: EditRequest,
        response_format: str,
        *,
        on_partial: PartialSink | None,
    ) -> tuple[EditOutcome, dict[str, Any]]:
        """Cache (-> forwarding), usage, and the ImagesResponse in the format asked for."""
        # From here the cache owns the uploads: a paid upstream call may outlive this request.
        run = self._cache.run(
            edit,
            release=form.close,
            policy=call.cache_policy,
            client_scope=call.client_scope,
            on_partial=on_partial,
            on_attempt=call.record.note_attempt,
        )
        read_timeout = call.read_timeout
        try:
            if edit.stream:
                # The event stream sends keep-alives, and ends when a send finds the client gone.
                outcome = await run
            else:
                patience = None if read_timeout is None else read_timeout + GRACE_SECONDS
                async with asyncio.timeout(patience):
                    outcome = await while_client_waits(call.receive, run)
        except TimeoutError:
            # The client has stopped reading by now. The charge stays, as for a client that
            # disconnects: a paid call may still be running for it.
            raise UpstreamTimeout(
                f"No answer within the client's own timeout ({read_timeout or 0:g} s); the edit "
                "may still be running, and a retry joins it or finds it cached.",
                code="client_timeout",
            ) from None
        except GatewayError as error:
            await metered.failed(edit, error)
            raise
        await metered.answered(
            edit,
            outcome.result.body,
            images=len(outcome.result.images),
            cache_hit=outcome.x_cache == "hit",
        )
        call.record.cache = outcome.x_cache
        call.record.images_out = len(outcome.result.images)
        # Without public_base_url the URL follows the request's own Host header; it is built per
        # response (never stored), so a forged Host only ever reaches the client that forged it.
        base_url = self._settings.public_base_url or call.base_url
        body = outcome.result.render(
            response_format, lambda file_id, ext: file_url(base_url, file_id, ext)
        )
        if outcome.x_cache == "hit":
            # The tokens were spent once, by the call that filled the cache; /admin/usage counts
            # them as saved.
            body = spent_nothing(body)
        return outcome, body

    async def _body(
        self,
        call: ImageCall,
        metered: MeteredEdit,
        form: IntakeForm,
        edit: EditRequest,
        on_partial: PartialSink,
    ) -> dict[str, Any]:
        """The streamed answer's ImagesResponse (b64_json: the events carry the bytes)."""
        _outcome, body = await self._answer(
            call, metered, form, edit, "b64_json", on_partial=on_partial
        )
        return body


def file_url(base_url: str, file_id: str, ext: str) -> str:
    """Where GET /v1/images/files/{id}.{ext} serves a hosted image."""
    return f"{base_url}/v1/images/files/{file_id}.{ext}"


def _note_request(record: RequestRecord, edit: EditRequest, log_prompts: bool) -> None:
    record.model = edit.model.name
    record.images_in = len(edit.images)
    if log_prompts:
        record.prompt = edit.prompt


def _note_form(
    record: RequestRecord, form: IntakeForm, catalog: Catalog, default_model: str
) -> None:
    """What the log line and metrics may know even if validation then refuses the request:
    sizes, the model asked for (only if the catalog has it) and the prompt's length, never its
    text."""
    record.upload_bytes = sum(upload.size for upload in form.files)
    model = default_model
    for text in form.fields:
        if text.name == "prompt":
            record.prompt_chars = len(text.value)
        elif text.name == "model":
            model = text.value
    record.model = model if catalog.get(model) is not None else None
