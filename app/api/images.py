"""POST /v1/images/edits and /v1/images/generations: client limits -> intake (multipart or
JSON) -> validation -> cache (-> forwarding) -> ImagesResponse, or server-sent events when the
client streams."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import orjson
from fastapi import Request
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.routing import Match, Route
from starlette.types import Scope

from app.api.deps import client_of, gateway_of
from app.api.files import file_url
from app.cache.service import EditOutcome, policy_from_header, response_format_of
from app.catalog import Catalog
from app.client_wait import GRACE_SECONDS, client_read_timeout, while_client_waits
from app.clients.directory import ClientPolicy
from app.clients.gate import MeteredEdit
from app.edit import EditRequest
from app.errors import GatewayError, UpstreamTimeout
from app.intake.form import IntakeForm, read_form
from app.intake.json_body import JsonEditReader, is_json, read_json_object, text_fields
from app.request_record import current_record
from app.runtime import Gateway
from app.streaming import event_stream, prepend
from app.validation import validate_edit, validate_generation


async def create_image_edit(request: Request) -> Response:
    gateway = gateway_of(request)
    return await _serve(request, gateway, client_of(request, gateway), _read_edit)


async def create_image_generation(request: Request) -> Response:
    gateway = gateway_of(request)
    return await _serve(request, gateway, client_of(request, gateway), _read_generation)


class _ImageRoute(Route):
    """A plain Starlette route: the two hot endpoints take the raw request and answer a Response,
    so FastAPI's per-request dependency solving and endpoint wrapping (about 0.2 ms) buy nothing.
    Like FastAPI's routes it puts itself in the scope, where metrics and the access log read the
    route's template."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


# Added to the app's router by app/main.py.
routes = [
    _ImageRoute("/v1/images/edits", create_image_edit, methods=["POST"]),
    _ImageRoute("/v1/images/generations", create_image_generation, methods=["POST"]),
]


# Reads and validates one request: the form (it owns the uploads) and what it asks for.
Reader = Callable[[Request, Gateway], Awaitable[tuple[IntakeForm, EditRequest]]]


async def _serve(
    request: Request, gateway: Gateway, client: ClientPolicy, read: Reader
) -> Response:
    # The client's requests/min and concurrency are checked before the body is read; a
    # streamed answer holds its slot until its last event.
    held = AsyncExitStack()
    metered = await held.enter_async_context(
        gateway.clients.gate.enter(client, request.state.request_id)
    )
    try:
        try:
            form, edit = await read(request, gateway)
        except ClientDisconnect:
            return _client_gone()
        try:
            # 403 for a model this client may not use; then images/min and quotas are charged
            # (given back below for a cache hit, or when the upstream makes nothing).
            await metered.charge(edit)
        except BaseException:
            form.close()
            raise
        if edit.stream:
            produce = partial(_answer, request, gateway, metered, form, edit, "b64_json")
            owned = held.pop_all()  # the stream releases the slot once it ends
            stream = event_stream(
                edit,
                lambda: _body_of(produce()),
                redact=gateway.redactor,
                finish=owned.aclose,
                raise_before_events=True,
            )
            # The first event (or keep-alive) decides the status: a failure before it is an
            # ordinary error response, with its status and retry headers.
            first = await anext(stream)
            return StreamingResponse(
                prepend(first, stream),
                media_type="text/event-stream",
                headers={"cache-control": "no-cache", **metered.headers},
                # Also here: a stream the server never starts never runs its own cleanup.
                background=BackgroundTask(owned.aclose),
            )
        try:
            outcome, body = await _answer(
                request, gateway, metered, form, edit, response_format_of(edit)
            )
        except ClientDisconnect:
            return _client_gone()
        headers = {"x-cache": outcome.x_cache, "age": str(outcome.age), **metered.headers}
        if outcome.upstream_request_id:
            headers["x-request-id"] = outcome.upstream_request_id
        return Response(orjson.dumps(body), media_type="application/json", headers=headers)
    finally:
        await held.aclose()


async def _read_edit(request: Request, gateway: Gateway) -> tuple[IntakeForm, EditRequest]:
    settings = gateway.settings
    max_file_bytes = min(int(settings.limits.max_file_bytes), settings.catalog.max_image_bytes)
    content_type = request.headers.get("content-type")
    policy = policy_from_header(request.headers.get("cache-control"))
    hash_uploads = gateway.cache.needs_fingerprint(policy)
    if is_json(content_type):
        body = await read_json_object(
            request.stream(), content_type=content_type, limits=settings.limits
        )
        reader = JsonEditReader(
            settings.limits,
            max_file_bytes=max_file_bytes,
            fetch_url=gateway.image_urls,
            worker=gateway.spool_worker,
            hash_uploads=hash_uploads,
        )
        form = await reader.form(body)
    else:
        form = await read_form(
            request.stream(),
            content_type=content_type,
            content_length=request.headers.get("content-length"),
            limits=settings.limits,
            max_file_bytes=max_file_bytes,
            worker=gateway.spool_worker,
            hash_uploads=hash_uploads,
        )
    _note_form(form, settings.catalog, settings.default_model)
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
    _note_request(edit, settings.logging.log_prompts)
    return form, edit


async def _read_generation(request: Request, gateway: Gateway) -> tuple[IntakeForm, EditRequest]:
    settings = gateway.settings
    body = await read_json_object(
        request.stream(),
        content_type=request.headers.get("content-type"),
        limits=settings.limits,
    )
    form = IntakeForm(fields=text_fields(body))
    _note_form(form, settings.catalog, settings.default_model)
    edit = validate_generation(form, settings.catalog, default_model=settings.default_model)
    _note_request(edit, settings.logging.log_prompts)
    return form, edit


def _note_request(edit: EditRequest, log_prompts: bool) -> None:
    record = current_record()
    record.model = edit.model.name
    record.images_in = len(edit.images)
    if log_prompts:
        record.prompt = edit.prompt


async def _answer(
    request: Request,
    gateway: Gateway,
    metered: MeteredEdit,
    form: IntakeForm,
    edit: EditRequest,
    response_format: str,
) -> tuple[EditOutcome, dict[str, Any]]:
    """Cache (-> forwarding), usage, and the ImagesResponse in the format asked for."""
    settings = gateway.settings
    # From here the cache owns the uploads: a paid upstream call may outlive this request.
    run = gateway.cache.run(
        edit,
        release=form.close,
        policy=policy_from_header(request.headers.get("cache-control")),
        client_scope=_client_scope(request),
    )
    read_timeout = client_read_timeout(request.headers)
    try:
        if edit.stream:
            # The event stream sends keep-alives, and ends when a send finds the client gone.
            outcome = await run
        else:
            patience = None if read_timeout is None else read_timeout + GRACE_SECONDS
            async with asyncio.timeout(patience):
                outcome = await while_client_waits(request.receive, run)
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
    record = current_record()
    record.cache = outcome.x_cache
    record.images_out = len(outcome.result.images)
    # Without public_base_url the URL follows the request's own Host header; it is built per
    # response (never stored), so a forged Host only ever reaches the client that forged it.
    base_url = settings.public_base_url or str(request.base_url).rstrip("/")
    body = outcome.result.render(
        response_format, lambda file_id, ext: file_url(base_url, file_id, ext)
    )
    return outcome, body


def _client_gone() -> Response:
    # Nobody is left to answer; 499 is what the access log will show.
    return Response(status_code=499)


async def _body_of(answer: Awaitable[tuple[EditOutcome, dict[str, Any]]]) -> dict[str, Any]:
    _outcome, body = await answer
    return body


def _client_scope(request: Request) -> str:
    # Per-client cache entries follow the key itself (by digest, never the key), not its
    # position in GATEWAY_CLIENT_KEYS, so reordering keys cannot hand one client another's.
    presented = request.headers.get("authorization", "")
    return hashlib.sha256(presented.encode("latin-1", "replace")).hexdigest()


def _note_form(form: IntakeForm, catalog: Catalog, default_model: str) -> None:
    """What the log line and metrics may know even if validation then refuses the request:
    sizes, the model asked for (only if the catalog has it) and the prompt's length, never its
    text."""
    record = current_record()
    record.upload_bytes = sum(upload.size for upload in form.files)
    model = default_model
    for text in form.fields:
        if text.name == "prompt":
            record.prompt_chars = len(text.value)
        elif text.name == "model":
            model = text.value
    record.model = model if catalog.get(model) is not None else None
