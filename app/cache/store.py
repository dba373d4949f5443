"""Where cache entries and hosted files live: Redis (shared by replicas) or an in-process LRU.

Key layout (Redis Cluster ready: the keys one operation touches share a hash tag, and the Lua
script touches only the keys it declares):
  igw:c1:{<fingerprint>}:entry   the entry's metadata (EntryMeta JSON), TTL per model
  igw:c1:{<fingerprint>}:lock    single-flight lease: the token of the request paying upstream,
                                 short-lived and renewed while that call runs (app/cache/lease.py)
  igw:f1:{<file id>}:<ext>       one image's bytes, served at /v1/images/files/<id>.<ext>
Keys hold hashes and random ids only: never a client's or upstream's key, never a filename.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import redis.asyncio as aioredis

from app.cache.entry import EntryMeta
from app.errors import StoreUnavailable
from app.shared_state.failures import store_errors

T = TypeVar("T")
LookupState = Literal["hit", "lead", "wait"]
Clock = Callable[[], float]

_ENTRY_PREFIX = "igw:c1:"
_FILE_PREFIX = "igw:f1:"

# Atomic so that "no entry" and "someone is already paying for it" are one observation: a
# follower can never miss the entry its leader wrote just before releasing the lease. A lookup
# sent twice (its connection dropped) finds its own token and still leads.
_LOOKUP_OR_LEAD = """
local entry = redis.call('GET', KEYS[1])
if entry then return {1, entry} end
if ARGV[1] ~= '' then
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, ''} end
  if redis.call('GET', KEYS[2]) == ARGV[1] then return {2, ''} end
end
return {0, ''}
"""
# Only the holder's own token releases the lease (a slow leader must not free a newer one).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# Extends the holder's lease; a lease that is gone (Redis restarted empty) is taken again, so
# followers elsewhere keep waiting for this call instead of paying for another. 0: another
# request holds it now.
_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if not holder then
  if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
end
return 0
"""


class MarkedDown(StoreUnavailable):
    """Redis failed a moment ago, so this operation was not even sent (nothing changed).

    Any other StoreUnavailable: the store could not answer in time (the operation may or may not
    have happened). Either way the caller serves the request uncached."""


@dataclass(frozen=True, slots=True)
class Lookup:
    state: LookupState
    meta: EntryMeta | None = None


@dataclass(frozen=True, slots=True)
class HostedFile:
    data: bytes
    ttl_seconds: float | None


class CacheStore(Protocol):
    kind: str  # "redis" | "embedded"

    async def lookup(self, fingerprint: str, *, lead_token: str | None, lease: float) -> Lookup:
        """The entry if stored; else `lead` if the lease was taken with lead_token, or `wait`."""
        ...

    async def renew(self, fingerprint: str, token: str, lease: float) -> bool:
        """Extend `token`'s lease (or take it again if nobody holds it); False if another
        request holds it now."""
        ...

    async def release(self, fingerprint: str, token: str) -> None:
        """Drop the lease if `token` still holds it (never another request's)."""
        ...

    async def put_entry(self, fingerprint: str, meta: bytes, ttl: int) -> None: ...

    async def put_files(self, files: list[tuple[str, str, bytes]], ttl: int) -> None: ...

    async def get_files(self, files: list[tuple[str, str]]) -> list[bytes | None]: ...

    async def get_file(self, file_id: str, ext: str) -> HostedFile | None: ...

    async def check(self) -> None:
        """Raise StoreUnavailable unless the store answers now (for /readyz)."""
        ...

    async def aclose(self) -> None: ...


def entry_key(fingerprint: str) -> str:
    return f"{_ENTRY_PREFIX}{{{fingerprint}}}:entry"


def lock_key(fingerprint: str) -> str:
    return f"{_ENTRY_PREFIX}{{{fingerprint}}}:lock"


def file_key(file_id: str, ext: str) -> str:
    return f"{_FILE_PREFIX}{{{file_id}}}:{ext}"


class RedisStore:
    kind = "redis"

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        timeout: float,
        retry_after: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self._redis = redis
        self._timeout = timeout
        self._retry_after = retry_after
        self._clock = clock
        self._down_until = 0.0
        self._lookup_script = redis.register_script(_LOOKUP_OR_LEAD)
        self._release_script = redis.register_script(_RELEASE)
        self._renew_script = redis.register_script(_RENEW)

    async def _call(self, operation: Callable[[], Awaitable[T]], *, lease: bool = False) -> T:
        # After a failure, skip Redis for a moment instead of paying its timeout on every request;
        # the first call after that window probes it again, so caching resumes by itself. Lease
        # renewals and releases are always sent: one per leader, and a lease left behind would
        # keep other replicas' followers waiting for a call that has ended.
        if not lease and self._clock() < self._down_until:
            raise MarkedDown(
                "The cache's Redis failed a moment ago; not asked again yet.",
                action="use the cache",
            )
        try:
            with store_errors("use the cache"):
                async with asyncio.timeout(self._timeout):
                    return await operation()
        except StoreUnavailable:
            self._down_until = self._clock() + self._retry_after
            raise

    async def lookup(self, fingerprint: str, *, lead_token: str | None, lease: float) -> Lookup:
        keys = [entry_key(fingerprint), lock_key(fingerprint)]
        args: list[str | int] = [lead_token or "", _milliseconds(lease)]

        async def run() -> list[object]:
            result = await self._lookup_script(keys=keys, args=args)
            assert isinstance(result, list)
            return result

        state, payload = await self._call(run)
        if state == 1:
            assert isinstance(payload, bytes)
            return Lookup("hit", EntryMeta.parse(payload))
        return Lookup("lead" if state == 2 else "wait")

    async def renew(self, fingerprint: str, token: str, lease: float) -> bool:
        async def run() -> object:
            return await self._renew_script(
                keys=[lock_key(fingerprint)], args=[token, _milliseconds(lease)]
            )

        return bool(await self._call(run, lease=True))

    async def release(self, fingerprint: str, token: str) -> None:
        async def run() -> object:
            return await self._release_script(keys=[lock_key(fingerprint)], args=[token])

        await self._call(run, lease=True)

    async def put_entry(self, fingerprint: str, meta: bytes, ttl: int) -> None:
        async def run() -> object:
            return await self._redis.set(entry_key(fingerprint), meta, ex=ttl)

        await self._call(run)

    async def put_files(self, files: list[tuple[str, str, bytes]], ttl: int) -> None:
        async def run() -> object:
            # Not a transaction: each file is its own slot in a cluster. Files are written
            # before the entry that names them, so a visible entry never points at nothing.
            async with self._redis.pipeline(transaction=False) as pipe:
                for file_id, ext, data in files:
                    pipe.set(file_key(file_id, ext), data, ex=ttl)
                return await pipe.execute()

        await self._call(run)

    async def get_files(self, files: list[tuple[str, str]]) -> list[bytes | None]:
        async def run() -> list[bytes | None]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for file_id, ext in files:
                    pipe.get(file_key(file_id, ext))
                return list(await pipe.execute())

        return await self._call(run)

    async def get_file(self, file_id: str, ext: str) -> HostedFile | None:
        key = file_key(file_id, ext)

        async def run() -> list[object]:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                return list(await pipe.execute())

        data, pttl = await self._call(run)
        if not isinstance(data, bytes):
            return None
        ttl = int(pttl) / 1000 if isinstance(pttl, int) and pttl > 0 else None
        return HostedFile(data=data, ttl_seconds=ttl)

    async def check(self) -> None:
        with store_errors("reach the cache"):
            async with asyncio.timeout(max(self._timeout, 1.0)):
                await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


class MemoryStore:
    """An LRU bounded by bytes, for a single replica without Redis. Same contract as Redis."""

    kind = "embedded"

    def __init__(self, *, max_bytes: int, clock: Clock = time.monotonic) -> None:
        self._max_bytes = max_bytes
        self._clock = clock
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._bytes = 0
        self._locks: dict[str, tuple[str, float]] = {}

    def _get(self, key: str) -> tuple[bytes, float] | None:
        item = self._items.get(key)
        if item is None:
            return None
        if item[1] <= self._clock():
            self._drop(key)
            return None
        self._items.move_to_end(key)
        return item

    def _put(self, key: str, value: bytes, ttl: float) -> None:
        self._drop(key)
        if len(value) > self._max_bytes:
            return
        self._items[key] = (value, self._clock() + ttl)
        self._bytes += len(value)
        while self._bytes > self._max_bytes:
            oldest = next(iter(self._items))
            self._drop(oldest)

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self._bytes -= len(item[0])

    async def lookup(self, fingerprint: str, *, lead_token: str | None, lease: float) -> Lookup:
        item = self._get(entry_key(fingerprint))
        if item is not None:
            return Lookup("hit", EntryMeta.parse(item[0]))
        now = self._clock()
        held = self._locks.get(fingerprint)
        if lead_token and (held is None or held[1] <= now or held[0] == lead_token):
            self._locks[fingerprint] = (lead_token, now + lease)
            return Lookup("lead")
        return Lookup("wait")

    async def renew(self, fingerprint: str, token: str, lease: float) -> bool:
        now = self._clock()
        held = self._locks.get(fingerprint)
        if held is not None and held[0] != token and held[1] > now:
            return False
        self._locks[fingerprint] = (token, now + lease)
        return True

    async def release(self, fingerprint: str, token: str) -> None:
        held = self._locks.get(fingerprint)
        if held is not None and held[0] == token:
            del self._locks[fingerprint]

    async def put_entry(self, fingerprint: str, meta: bytes, ttl: int) -> None:
        self._put(entry_key(fingerprint), meta, ttl)

    async def put_files(self, files: list[tuple[str, str, bytes]], ttl: int) -> None:
        for file_id, ext, data in files:
            self._put(file_key(file_id, ext), data, ttl)

    async def get_files(self, files: list[tuple[str, str]]) -> list[bytes | None]:
        found = [self._get(file_key(file_id, ext)) for file_id, ext in files]
        return [item[0] if item is not None else None for item in found]

    async def get_file(self, file_id: str, ext: str) -> HostedFile | None:
        item = self._get(file_key(file_id, ext))
        if item is None:
            return None
        return HostedFile(data=item[0], ttl_seconds=max(0.0, item[1] - self._clock()))

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        self._items.clear()
        self._bytes = 0


def _milliseconds(seconds: float) -> int:
    return max(1, int(seconds * 1000))
