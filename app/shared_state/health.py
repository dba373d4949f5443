"""A periodic ping of the state Redis, so `gateway_redis_up` (and the Redis-down alert) tells the
truth even when no request touches Redis, and a fresh look at its persistence and eviction policy
(app/shared_state/durability.py). The cache's Redis is checked by /readyz (`checks.cache`)."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from app.observability.metrics import GatewayMetrics
from app.shared_state.durability import DurabilityCheck

log = logging.getLogger("gateway.redis")


async def check_redis(redis: aioredis.Redis, metrics: GatewayMetrics, component: str) -> bool:
    """Ping once (1 s budget), record the result, and say whether Redis answered."""
    try:
        async with asyncio.timeout(1.0):
            await redis.ping()
    except Exception:
        metrics.record_redis_error(component)
        metrics.set_redis_up(False)
        return False
    metrics.set_redis_up(True)
    return True


async def watch_redis(
    redis: aioredis.Redis,
    metrics: GatewayMetrics,
    *,
    interval: float = 15.0,
    durability: DurabilityCheck | None = None,
) -> None:
    was_up = True
    while True:
        up = await check_redis(redis, metrics, "health")
        if up != was_up:
            # Logged on change only: a Redis outage must not flood the log.
            (log.info if up else log.warning)("redis is %s", "reachable" if up else "unreachable")
            was_up = up
        if up and durability is not None:
            # Again each round: a failover, a restart or an operator may have changed it.
            await durability.check()
        await asyncio.sleep(interval)
