"""Runtime client keys in a real Redis: digests only, seen by every replica, revocation bounded
by the refresh interval, and the last known keys kept when Redis is unreachable."""

from __future__ import annotations

import asyncio

import pytest

from app.errors import StoreUnavailable
from app.tenants.keystore import RuntimeKeyStore, key_digest
from tests.support.servers import free_port
from tests.unit.tenants.conftest import fresh_namespace, redis_client


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keystore_key_is_stored_as_a_digest_only(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        store = RuntimeKeyStore(redis, namespace=namespace)
        key, record = await store.create("team", "laptop")
        assert key.startswith("igw-") and len(key) >= 40
        assert record.client == "team" and record.id.startswith("key_")
        dumped = []
        async for name in redis.scan_iter(match=f"{namespace}:*"):
            assert name.decode().startswith(f"{namespace}:{{clientkeys}}:")
            kind = await redis.type(name)
            if kind == b"hash":
                dumped.append(repr(await redis.hgetall(name)))
            else:
                dumped.append(repr(await redis.get(name)))
        everything = " ".join(dumped)
        assert key not in everything and key[4:20] not in everything
        assert key_digest(key) in everything
        assert await store.lookup(key_digest(key)) == "team"
        assert [r.id for r in await store.list("team")] == [record.id]
        assert await store.list("other") == []
        await redis.aclose()

    asyncio.run(scenario())


def test_keystore_other_replica_sees_new_key_at_once_and_revocation_within_interval(
    clients_redis_url: str,
) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        clock = ManualClock()
        here = RuntimeKeyStore(redis, namespace=namespace)
        there = RuntimeKeyStore(redis, namespace=namespace, clock=clock, refresh_interval=0.25)
        assert await there.lookup(key_digest("igw-unknown")) is None  # warm, empty cache

        key, record = await here.create("team")
        # Unknown to `there`'s cache: it asks Redis at once, no interval to wait out.
        assert await there.lookup(key_digest(key)) == "team"

        assert await here.revoke("team", record.id)
        assert await here.lookup(key_digest(key)) is None
        clock.now += 0.1  # within the interval `there` may still trust its cache...
        assert await there.lookup(key_digest(key)) == "team"
        clock.now += 0.2  # ...and past it, it must have re-read the version
        assert await there.lookup(key_digest(key)) is None
        await redis.aclose()

    asyncio.run(scenario())


def test_keystore_revoke_only_the_owners_key(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        store = RuntimeKeyStore(redis, namespace=fresh_namespace())
        key, record = await store.create("team")
        assert not await store.revoke("intruder", record.id)
        assert not await store.revoke("team", "key_nope")
        assert await store.lookup(key_digest(key)) == "team"
        await redis.aclose()

    asyncio.run(scenario())


def test_keystore_keeps_last_known_keys_when_redis_is_down(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        errors: list[str] = []
        clock = ManualClock()
        store = RuntimeKeyStore(redis, namespace=namespace, clock=clock)
        key, _ = await store.create("team")
        assert await store.lookup(key_digest(key)) == "team"
        # The same store pointed at a dead Redis (the connection is what fails).
        dead = redis_client(f"redis://127.0.0.1:{free_port()}/0")
        store._redis = dead
        store._on_store_error = errors.append
        clock.now += 10
        assert await store.lookup(key_digest(key)) == "team"
        assert errors == ["client_keys"]
        with pytest.raises(StoreUnavailable):
            await store.create("team")
        await redis.aclose()
        await dead.aclose()

    asyncio.run(scenario())
