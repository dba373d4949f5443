"""GET /healthz (the process is alive) and GET /readyz (its dependencies are usable)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.redis_health import check_redis

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(request: Request, gateway: GatewayDep) -> Response:
    problems: list[str] = []
    checks: dict[str, str] = {}
    if request.app.state.drain.draining:
        # Shutting down: load balancers must stop sending work here now.
        checks["shutdown"] = "draining"
        problems.append("the gateway is shutting down")
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
        if await check_redis(gateway.redis, gateway.metrics, "health"):
            checks["redis"] = "ok"
        else:
            checks["redis"] = "unreachable"
            problems.append("redis unreachable")
    status = 503 if problems else 200
    body = {
        "status": "ready"
        if not problems
        else ("draining" if request.app.state.drain.draining else "not ready"),
        "checks": checks,
        "problems": problems,
    }
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
