"""GET /metrics: Prometheus' text exposition of the gateway's metrics."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.errors import AuthenticationFailed
from app.observability.metrics import CONTENT_TYPE

router = APIRouter()


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@router.get("/metrics")
async def scrape_metrics(request: Request, gateway: GatewayDep) -> Response:
    settings = gateway.settings
    # Without a token and not public, client auth already guarded this path.
    if settings.metrics_token is not None and not settings.metrics.public:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        expected = _digest(settings.metrics_token.get_secret_value())
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            _digest(presented.strip()), expected
        ):
            raise AuthenticationFailed(
                "GET /metrics needs the metrics token: `Authorization: Bearer <token>`.",
                headers={"www-authenticate": "Bearer"},
            )
    await gateway.metrics.refresh_keys()
    await gateway.metrics.refresh_budgets()
    return Response(gateway.metrics.scrape(), media_type=CONTENT_TYPE)
