"""GET /v1/models and GET /v1/models/{id}: the catalog in OpenAI's model shapes.

A client sees only the models it may use: one outside its list is as unknown to it as a model
the catalog lacks (404), so the listing and the lookup never disagree.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import ClientDep, GatewayDep
from app.config.catalog import ModelRule
from app.errors import ModelNotFound

router = APIRouter()


def _model_object(name: str, model: ModelRule, *, demo: bool) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": 0,
        # In demo mode no real upstream is involved, and the listing says so.
        "owned_by": "image-gateway-demo" if demo else model.owned_by,
    }


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, client: ClientDep) -> Response:
    settings = gateway.settings
    data = [
        _model_object(name, model, demo=settings.demo)
        for name, model in settings.catalog.models.items()
        if client.may_use(name)  # a client sees only the models it may use
    ]
    body: dict[str, object] = {"object": "list", "data": data}
    if settings.demo:
        body["demo"] = True
    return Response(orjson.dumps(body), media_type="application/json")


# `:path`: OpenAI model ids may hold a slash or a colon (fine-tunes, provider prefixes).
@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, gateway: GatewayDep, client: ClientDep) -> Response:
    settings = gateway.settings
    model = settings.catalog.get(model_id)
    if model is None or not client.may_use(model_id):
        shown = model_id if len(model_id) <= 100 else model_id[:100] + "..."
        raise ModelNotFound(
            f"The model {shown!r} does not exist or you do not have access to it.",
            param="model",
        )
    body = _model_object(model_id, model, demo=settings.demo)
    return Response(orjson.dumps(body), media_type="application/json")
