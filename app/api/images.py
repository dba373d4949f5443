"""POST /v1/images/edits: client limits -> intake -> validation -> cache (-> forwarding) ->
ImagesResponse."""

from __future__ import annotations

import hashlib

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.api.deps import ClientDep, GatewayDep
from app.api.files import file_url
from app.cache.service import policy_from_header, response_format_of
from app.catalog import Catalog
from app.clients.gate import MeteredEdit
from app.errors import GatewayError
from app.intake.form import IntakeForm, read_form
from app.request_record import current_record
from app.runtime import Gateway
from app.validation import validate_edit

router = APIRouter()


@router.post("/v1/images/edits")
async def create_image_edit(request: Request, gateway: GatewayDep, client: ClientDep) -> Response:
    # The client's requests/min and concurrency are checked before the upload is read.
    async with gateway.clients.gate.enter(client, request.state.request_id) as metered:
        return await _edit(request, gateway, metered)


async def _edit(request: Request, gateway: Gateway, metered: MeteredEdit) -> Response:
    settings = gateway.settings
    try:
        form = await read_form(
            request.stream(),
            content_type=request.headers.get("content-type"),
            content_length=request.headers.get("content-length"),
            limits=settings.limits,
            max_file_bytes=min(
                int(settings.limits.max_file_bytes), settings.catalog.max_image_bytes()
            ),
            worker=gateway.spool_worker,
        )
    except ClientDisconnect:
        # Nobody is left to answer; 499 is what the access log will show.
        return Response(status_code=499)
    record = current_record()
    _note_form(form, settings.catalog, settings.default_model)
    try:
        edit = validate_edit(
            form,
            settings.catalog,
            default_model=settings.default_model,
            max_pixels=settings.limits.max_pixels,
        )
        record.model = edit.model.name
        record.images_in = len(edit.images)
        if settings.logging.log_prompts:
            record.prompt = edit.prompt
        # 403 for a model this client may not use; then images/min and quotas are charged
        # (given back below for a cache hit, or when the upstream makes nothing).
        await metered.charge(edit)
    except BaseException:
        form.close()
        raise
    # From here the cache owns the uploads: a paid upstream call may outlive this request.
    try:
        outcome = await gateway.cache.run(
            edit,
            release=form.close,
            policy=policy_from_header(request.headers.get("cache-control")),
            client_scope=_client_scope(request),
        )
    except GatewayError as error:
        await metered.failed(edit, error)
        raise
    await metered.answered(
        edit,
        outcome.result.body,
        images=len(outcome.result.images),
        cache_hit=outcome.x_cache == "hit",
    )
    record.cache = outcome.x_cache
    record.images_out = len(outcome.result.images)
    # Without public_base_url the URL follows the request's own Host header; it is built per
    # response (never stored), so a forged Host only ever reaches the client that forged it.
    base_url = settings.public_base_url or str(request.base_url).rstrip("/")
    body = outcome.result.render(
        response_format_of(edit), lambda file_id, ext: file_url(base_url, file_id, ext)
    )
    headers = {"x-cache": outcome.x_cache, "age": str(outcome.age), **metered.headers}
    if outcome.upstream_request_id:
        headers["x-request-id"] = outcome.upstream_request_id
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


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
