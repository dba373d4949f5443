"""Where key health and rpm counters live: Redis (shared by replicas) or this process's memory.

Redis layout, designed for Redis Cluster: every key of one upstream shares the hash tag
`{pool:<upstream>}`, and each Lua script touches only the keys it declares.
  <ns>:{pool:<upstream>}:key:<key id>          JSON KeyHealth (ids are config names, never secrets)
  <ns>:{pool:<upstream>}:rpm:<key id>:<minute>  requests started in that minute
When Redis is unreachable, FailoverStore serves from memory, says so once in the log, and merges
what it learnt back into Redis when Redis returns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

import redis.asyncio as aioredis

from app.errors import StoreUnavailable
from app.keys.health import KeyHealth, merge
from app.shared_state.failures import store_errors

log = logging.getLogger("gateway.keys")

Change = Callable[[KeyHealth], KeyHealth]

# Health records outlive any cooldown or ejection; a disabled key's record is rewritten at every
# probe, so only keys nobody has touched for a week fall back to healthy.
STATE_TTL_SECONDS = 7 * 24 * 3600
RPM_WINDOW_SECONDS = 60
# Updates of one key are serialised within a replica, so only replicas race each other.
_UPDATE_ATTEMPTS = 50

# Compare-and-set: write ARGV[2] only if the record still holds ARGV[1] ("" = absent).
_CAS = """
local current = redis.call('GET', KEYS[1])
if (current or '') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', tonumber(ARGV[3]))
return 1
"""

# Count a request against a per-minute cap, refusing (and not counting) once it is reached.
_TAKE_RPM = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used >= tonumber(ARGV[1]) then return 0 end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


class StateStore(Protocol):
    async def load(self, upstream: str, key_ids: Sequence[str]) -> dict[str, KeyHealth]: ...

    async def update(
        self, upstream: str, key_id: str, change: Change
    ) -> tuple[KeyHealth, KeyHealth]:
        """Apply `change` atomically; returns the state before and after."""
        ...

    async def take_rpm(self, upstream: str, key_id: str, cap: int, now: float) -> bool:
        """Count one request in the current minute unless `cap` is reached."""
        ...

    def describe(self) -> str: ...


def minute_of(now: float) -> int:
    return int(now // RPM_WINDOW_SECONDS)


class MemoryStore:
    def __init__(self) -> None:
        self._states: dict[tuple[str, str], KeyHealth] = {}
        self._rpm: dict[tuple[str, str], tuple[int, int]] = {}

    async def load(self, upstream: str, key_ids: Sequence[str]) -> dict[str, KeyHealth]:
        return {key_id: self.get(upstream, key_id) for key_id in key_ids}

    async def update(
        self, upstream: str, key_id: str, change: Change
    ) -> tuple[KeyHealth, KeyHealth]:
        before = self.get(upstream, key_id)
        after = change(before)
        self._states[(upstream, key_id)] = after
        return before, after

    async def take_rpm(self, upstream: str, key_id: str, cap: int, now: float) -> bool:
        minute = minute_of(now)
        window, used = self._rpm.get((upstream, key_id), (minute, 0))
        if window != minute:
            used = 0
        if used >= cap:
            return False
        self._rpm[(upstream, key_id)] = (minute, used + 1)
        return True

    def get(self, upstream: str, key_id: str) -> KeyHealth:
        return self._states.get((upstream, key_id), KeyHealth())

    def put(self, upstream: str, key_id: str, state: KeyHealth) -> None:
        self._states[(upstream, key_id)] = state

    def describe(self) -> str:
        return "memory"


class RedisStore:
    def __init__(self, redis: aioredis.Redis, namespace: str = "igw") -> None:
        self._redis = redis
        self._namespace = namespace
        self._cas = redis.register_script(_CAS)
        self._take_rpm = redis.register_script(_TAKE_RPM)
        self._locks: dict[str, asyncio.Lock] = {}

    def state_key(self, upstream: str, key_id: str) -> str:
        return f"{self._namespace}:{{pool:{upstream}}}:key:{key_id}"

    def rpm_key(self, upstream: str, key_id: str, minute: int) -> str:
        return f"{self._namespace}:{{pool:{upstream}}}:rpm:{key_id}:{minute}"

    async def load(self, upstream: str, key_ids: Sequence[str]) -> dict[str, KeyHealth]:
        if not key_ids:
            return {}
        with store_errors("read key health"):
            raws = await self._redis.mget([self.state_key(upstream, key_id) for key_id in key_ids])
        return {key_id: KeyHealth.from_json(raw) for key_id, raw in zip(key_ids, raws, strict=True)}

    async def update(
        self, upstream: str, key_id: str, change: Change
    ) -> tuple[KeyHealth, KeyHealth]:
        name = self.state_key(upstream, key_id)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            before = KeyHealth()
            for _ in range(_UPDATE_ATTEMPTS):
                with store_errors("update key health"):
                    raw = await self._redis.get(name)
                    before = KeyHealth.from_json(raw)
                    after = change(before)
                    if after == before:
                        return before, after
                    written = await self._cas(
                        keys=[name], args=[raw or b"", after.to_json(), STATE_TTL_SECONDS]
                    )
                if written:
                    return before, after
        # Only sustained contention on one key gets here; losing one health note is harmless.
        log.warning("key health update of %s lost to contention", key_id)
        return before, before

    async def take_rpm(self, upstream: str, key_id: str, cap: int, now: float) -> bool:
        name = self.rpm_key(upstream, key_id, minute_of(now))
        with store_errors("count a key's requests"):
            taken = await self._take_rpm(keys=[name], args=[cap, RPM_WINDOW_SECONDS * 2])
        return bool(taken)

    async def ping(self) -> None:
        with store_errors("reach key health"):
            await self._redis.ping()

    def describe(self) -> str:
        return "redis"


class FailoverStore:
    """Redis while it answers; this process's memory while it does not, then a resync."""

    def __init__(
        self,
        shared: RedisStore,
        local: MemoryStore,
        *,
        clock: Callable[[], float],
        retry_interval: float = 5.0,
        on_redis_error: Callable[[], None] | None = None,
    ) -> None:
        self._shared = shared
        self._local = local
        self._clock = clock
        # Counted (gateway_redis_errors_total{component="keys"}), so an outage shows on the
        # dashboard and not only in the one log line.
        self._on_redis_error = on_redis_error or (lambda: None)
        self._retry_interval = retry_interval
        self._down = False
        self._retry_at = 0.0
        # Keys whose health changed while Redis was away, to merge back when it returns.
        self._dirty: set[tuple[str, str]] = set()

    async def load(self, upstream: str, key_ids: Sequence[str]) -> dict[str, KeyHealth]:
        if await self._shared_usable():
            try:
                states = await self._shared.load(upstream, key_ids)
            except StoreUnavailable as exc:
                self._mark_down(exc)
            else:
                for key_id, state in states.items():
                    self._local.put(upstream, key_id, state)
                return states
        return await self._local.load(upstream, key_ids)

    async def update(
        self, upstream: str, key_id: str, change: Change
    ) -> tuple[KeyHealth, KeyHealth]:
        if await self._shared_usable():
            try:
                before, after = await self._shared.update(upstream, key_id, change)
            except StoreUnavailable as exc:
                self._mark_down(exc)
            else:
                self._local.put(upstream, key_id, after)
                return before, after
        before, after = await self._local.update(upstream, key_id, change)
        if after != before:
            self._dirty.add((upstream, key_id))
        return before, after

    async def take_rpm(self, upstream: str, key_id: str, cap: int, now: float) -> bool:
        if await self._shared_usable():
            try:
                return await self._shared.take_rpm(upstream, key_id, cap, now)
            except StoreUnavailable as exc:
                self._mark_down(exc)
        return await self._local.take_rpm(upstream, key_id, cap, now)

    def describe(self) -> str:
        return "memory (redis unreachable)" if self._down else "redis"

    def _mark_down(self, exc: StoreUnavailable) -> None:
        self._on_redis_error()
        self._retry_at = self._clock() + self._retry_interval
        if not self._down:
            self._down = True
            log.warning(
                "redis unreachable (%s): key health is per-replica until it returns", exc.cause
            )

    async def _shared_usable(self) -> bool:
        if not self._down:
            return True
        if self._clock() < self._retry_at:
            return False
        try:
            resynced = await self._resync()
        except StoreUnavailable:
            self._on_redis_error()
            self._retry_at = self._clock() + self._retry_interval
            return False
        self._down = False
        log.warning("redis is back: key health is shared again (%d keys resynced)", resynced)
        return True

    async def _resync(self) -> int:
        dirty = sorted(self._dirty)
        for upstream, key_id in dirty:
            local = self._local.get(upstream, key_id)
            await self._shared.update(upstream, key_id, partial(merge, local))
            self._dirty.discard((upstream, key_id))
        if not dirty:
            # Nothing to write back; a ping proves Redis answers again.
            await self._shared.ping()
        return len(dirty)
