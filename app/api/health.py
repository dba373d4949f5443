"""GET /healthz (the process is alive) and GET /readyz (its dependencies are usable)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.cache.store import CacheUnavailable
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
            # Redis only backs the cache, which fails open: the gateway still serves, uncached.
            checks["redis"] = "unreachable"
    # The cache is an optimisation: without it requests are served uncached, so a down cache
    # degrades the gateway rather than taking it out of rotation.
    try:
        await gateway.cache.store.check()
        checks["cache"] = "ok" if gateway.cache.store.kind == "redis" else "embedded"
    except CacheUnavailable:
        checks["cache"] = "degraded"
    status = 503 if problems else 200
    if problems:
        state = "draining" if request.app.state.drain.draining else "not ready"
    else:
        state = "degraded" if checks["cache"] == "degraded" else "ready"
    body = {
        "status": state,
        "checks": checks,
        "problems": problems,
    }
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")
