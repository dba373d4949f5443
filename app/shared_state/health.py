"""A periodic Redis ping, so `gateway_redis_up` (and the Redis-down alert) tells the truth even
when no request touches Redis."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as aioredis

from app.observability.metrics import GatewayMetrics

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
    redis: aioredis.Redis, metrics: GatewayMetrics, *, interval: float = 15.0
) -> None:
    was_up = True
    while True:
        up = await check_redis(redis, metrics, "health")
        if up != was_up:
            # Logged on change only: a Redis outage must not flood the log.
            (log.info if up else log.warning)("redis is %s", "reachable" if up else "unreachable")
            was_up = up
        await asyncio.sleep(interval)
