"""Counter increments made while Redis was unreachable, held in this process and added to Redis
once it answers again, so quotas and spend catch up with what was used during an outage."""

from __future__ import annotations

import redis.asyncio as aioredis

from app.errors import StoreUnavailable
from app.shared_state.failures import store_errors


class HeldIncrements:
    """key -> (amount, ttl seconds). Bounded by the keys a process charges: one per client,
    team and period."""

    def __init__(self) -> None:
        self._held: dict[str, tuple[int, int]] = {}

    def add(self, key: str, amount: int, ttl: int) -> None:
        held, _ = self._held.get(key, (0, ttl))
        self._held[key] = (held + amount, ttl)

    async def flush(self, redis: aioredis.Redis, action: str) -> int:
        """Add what is held to Redis; the number of keys added. Raises StoreUnavailable (named
        `action`) with everything still held when Redis does not take it."""
        if not self._held:
            return 0
        held, self._held = self._held, {}
        try:
            # One key per command: fine on Redis Cluster, where keys may sit on different slots.
            with store_errors(action):
                async with redis.pipeline(transaction=False) as pipe:
                    for key, (amount, ttl) in held.items():
                        pipe.incrby(key, amount)
                        pipe.expire(key, ttl)
                    await pipe.execute()
        except StoreUnavailable:
            for key, (amount, ttl) in held.items():
                self.add(key, amount, ttl)
            raise
        return len(held)
