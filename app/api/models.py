"""GET /v1/models: the catalog in OpenAI's list shape."""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import ClientDep, GatewayDep

router = APIRouter()


@router.get("/v1/models")
async def list_models(gateway: GatewayDep, client: ClientDep) -> Response:
    settings = gateway.settings
    data = [
        {
            "id": name,
            "object": "model",
            "created": 0,
            # In demo mode no real upstream is involved, and the listing says so.
            "owned_by": "image-gateway-demo" if settings.demo else model.owned_by,
        }
        for name, model in settings.catalog.models.items()
        if client.may_use(name)  # a client sees only the models it may use
    ]
    body: dict[str, object] = {"object": "list", "data": data}
    if settings.demo:
        body["demo"] = True
    return Response(orjson.dumps(body), media_type="application/json")
