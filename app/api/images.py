"""POST /v1/images/edits: intake -> validation -> forwarding -> ImagesResponse."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.catalog import Catalog
from app.images_response import normalize_images_response
from app.intake.form import IntakeForm, read_form
from app.request_record import current_record
from app.validation import validate_edit

router = APIRouter()


@router.post("/v1/images/edits")
async def create_image_edit(request: Request, gateway: GatewayDep) -> Response:
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
        answer, _upstream = await gateway.forwarder.edit(edit)
    finally:
        form.close()
    data = answer.body.get("data")
    record.images_out = len(data) if isinstance(data, list) else 0
    headers = {"x-request-id": answer.request_id} if answer.request_id else None
    return Response(
        orjson.dumps(normalize_images_response(answer.body)),
        media_type="application/json",
        headers=headers,
    )


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
