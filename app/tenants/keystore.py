"""Client keys created and revoked at run time, kept in Redis as SHA-256 digests only.

Redis layout (one hash tag, so every operation stays on one Redis Cluster slot):
  <ns>:{clientkeys}:by_digest   hash  sha256(key) hex -> JSON {id, client, created_at, label}
  <ns>:{clientkeys}:by_id       hash  key id -> sha256 hex (to revoke by id)
  <ns>:{clientkeys}:version     int   bumped by every create and revoke

How every replica sees a change within a second: each one caches the digest map and, before it
trusts the cache, re-reads `version` if its last look is older than `refresh_interval` (250 ms),
reloading the map only when the version moved. A key it does not know triggers that look at once,
so a key created on another replica works on its first request. Polling a version, rather than
pub/sub, needs no background connection and cannot miss a message across a reconnect.
When Redis is unreachable the last map read keeps serving (a revocation cannot be written then
either); the failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis

from app.errors import StoreUnavailable
from app.shared_state.failures import store_errors

log = logging.getLogger("gateway.clients")

KEY_PREFIX = "igw-"

_CREATE = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
return redis.call('INCR', KEYS[3])
"""

# Revoke by id, only if the key belongs to the named client; returns 1 when revoked.
_REVOKE = """
local digest = redis.call('HGET', KEYS[2], ARGV[1])
if not digest then return 0 end
local record = redis.call('HGET', KEYS[1], digest)
if record and cjson.decode(record)['client'] ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], digest)
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('INCR', KEYS[3])
return 1
"""


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    client: str
    created_at: int
    label: str | None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "client": self.client,
            "created_at": self.created_at,
            "label": self.label,
        }


class RuntimeKeyStore:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        namespace: str,
        refresh_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
        on_store_error: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = redis
        tag = f"{namespace}:{{clientkeys}}"
        self._by_digest = f"{tag}:by_digest"
        self._by_id = f"{tag}:by_id"
        self._version_key = f"{tag}:version"
        self._refresh_interval = refresh_interval
        self._clock = clock
        self._on_store_error = on_store_error
        self._records: dict[str, KeyRecord] = {}
        self._version: bytes | str | None = None
        self._checked_at = float("-inf")
        self._generation = 0
        self._refreshing: asyncio.Lock | None = None

    async def create(self, client: str, label: str | None = None) -> tuple[str, KeyRecord]:
        """A new key for `client`: the key itself (shown once, never stored) and its record."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        record = KeyRecord(
            id="key_" + secrets.token_hex(8),
            client=client,
            created_at=int(time.time()),
            label=label,
        )
        digest = key_digest(key)
        with self._reported("create a key"):
            await self._redis.eval(
                _CREATE,
                3,
                self._by_digest,
                self._by_id,
                self._version_key,
                digest,
                record.id,
                orjson.dumps(record.public()),
            )
        self._records[digest] = record
        return key, record

    async def revoke(self, client: str, key_id: str) -> bool:
        with self._reported("revoke a key"):
            revoked = await self._redis.eval(
                _REVOKE, 3, self._by_digest, self._by_id, self._version_key, key_id, client
            )
        # Forget it here at once; other replicas see the new version within refresh_interval.
        self._records = {d: r for d, r in self._records.items() if r.id != key_id}
        self._checked_at = float("-inf")
        return bool(revoked)

    async def list(self, client: str) -> list[KeyRecord]:
        with self._reported("list keys"):
            raw = await self._redis.hgetall(self._by_digest)
        records = (_record(value) for value in raw.values())
        return sorted(
            (r for r in records if r is not None and r.client == client),
            key=lambda r: (r.created_at, r.id),
        )

    async def lookup(self, digest: str) -> str | None:
        """The client owning the key with this SHA-256 hex digest, or None."""
        now = self._clock()
        stale = now - self._checked_at >= self._refresh_interval
        if stale or digest not in self._records:
            await self._refresh()
        record = self._records.get(digest)
        return record.client if record is not None else None

    async def _refresh(self) -> None:
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        generation = self._generation
        async with self._refreshing:
            if self._generation != generation:
                return  # a concurrent request refreshed while this one waited
            self._generation += 1
            try:
                with store_errors("refresh runtime keys"):
                    version = await self._redis.get(self._version_key)
                    raw = (
                        await self._redis.hgetall(self._by_digest)
                        if version != self._version
                        else None
                    )
            except StoreUnavailable as exc:
                self._report(exc)  # the last map read keeps serving
            else:
                if raw is not None:
                    records = {}
                    for digest, value in raw.items():
                        record = _record(value)
                        if record is not None:
                            records[_text(digest)] = record
                    self._records = records
                    self._version = version
            # Also after a failure: a dead Redis is asked again after the interval, not per request.
            self._checked_at = self._clock()

    @contextmanager
    def _reported(self, action: str) -> Iterator[None]:
        """Redis calls that cannot fail open: a failure is logged, counted, and raised."""
        try:
            with store_errors(action):
                yield
        except StoreUnavailable as exc:
            self._report(exc)
            raise

    def _report(self, exc: StoreUnavailable) -> None:
        log.warning("redis: cannot %s (%s)", exc.action, exc.cause)
        if self._on_store_error is not None:
            self._on_store_error("client_keys")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _record(value: bytes | str) -> KeyRecord | None:
    try:
        data = orjson.loads(value)
        return KeyRecord(
            id=str(data["id"]),
            client=str(data["client"]),
            created_at=int(data["created_at"]),
            label=data.get("label"),
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
