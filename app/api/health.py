"""GET /healthz (the process is alive) and GET /readyz (its dependencies are usable)."""

from __future__ import annotations

import asyncio

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import GatewayDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(gateway: GatewayDep) -> Response:
    problems: list[str] = []
    checks: dict[str, str] = {}
    settings = gateway.settings
    for name in sorted(settings.catalog.upstreams_in_use()):
        upstream = settings.upstreams[name]
        if settings.demo or upstream.type == "demo":
            checks[f"upstream:{name}"] = "demo"
        elif upstream.keys:
            checks[f"upstream:{name}"] = "ok"
        else:
            checks[f"upstream:{name}"] = "no keys"
            problems.append(f"upstream {name} has no keys")
    if gateway.redis is not None:
        try:
            async with asyncio.timeout(1.0):
                await gateway.redis.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            checks["redis"] = f"unreachable ({type(exc).__name__})"
            problems.append("redis unreachable")
    status = 503 if problems else 200
    body = {
        "status": "ready" if not problems else "not ready",
        "checks": checks,
        "problems": problems,
    }
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
