"""GET /healthz (the process is alive) and GET /readyz (its dependencies are usable).

While the gateway drains, app/server/drain.py answers both 503 before they get here.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.errors import StoreUnavailable
from app.shared_state.health import check_redis
from app.wiring import Gateway

router = APIRouter()


@router.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@router.get("/readyz")
async def readyz(gateway: GatewayDep) -> Response:
    problems: list[str] = []
    checks: dict[str, str] = {}
    settings = gateway.settings
    key_states = await _key_states(gateway)
    degraded_upstreams = False
    for name in sorted(settings.catalog.upstreams_in_use()):
        upstream = settings.upstreams[name]
        states = key_states.get(name, {})
        if settings.demo or upstream.type == "demo":
            checks[f"upstream:{name}"] = "demo"
        elif not upstream.keys:
            checks[f"upstream:{name}"] = "no keys"
            problems.append(f"upstream {name} has no keys")
        elif states.get("healthy", 0):
            checks[f"upstream:{name}"] = "ok"
        else:
            # Every key is cooling, ejected or disabled. Other replicas share the same keys, so
            # leaving rotation would not help: ready, degraded, and it says why.
            held = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
            checks[f"upstream:{name}"] = f"no usable key ({held})"
            degraded_upstreams = True
    if gateway.redis is not None:
        if await check_redis(gateway.redis, gateway.metrics, "health"):
            checks["redis"] = "ok"
        else:
            # Everything on the state Redis fails open: the gateway still serves.
            checks["redis"] = "unreachable"
    # The cache is an optimisation: without it requests are served uncached, so a down cache
    # degrades the gateway rather than taking it out of rotation.
    try:
        await gateway.cache.store.check()
        checks["cache"] = "ok" if gateway.cache.store.kind == "redis" else "embedded"
    except StoreUnavailable:
        checks["cache"] = "degraded"
    status = 503 if problems else 200
    if problems:
        state = "not ready"
    else:
        degraded = checks["cache"] == "degraded" or degraded_upstreams
        state = "degraded" if degraded else "ready"
    body: dict[str, object] = {
        "status": state,
        "checks": checks,
        "problems": problems,
        # Keys by state per upstream (counts only: ids and health are under /admin/keys).
        "keys": key_states,
    }
    # Persistence and eviction of the state Redis, as last read (at startup, then every 15 s).
    # A warning, not a reason to leave rotation: every replica shares that Redis.
    if gateway.durability is not None and (durability := gateway.durability.as_json()):
        body["state_redis"] = durability
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def _key_states(gateway: Gateway) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for key in await gateway.forwarder.pool.snapshots():
        by_state = counts.setdefault(key.upstream, {})
        by_state[key.state] = by_state.get(key.state, 0) + 1
    return counts
