"""Key health in a real Redis: shared by pools as by replicas, atomic, Cluster-shaped keys with no
secrets, and a memory fallback that logs once and resyncs when Redis returns."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr

from app.config.settings import KeySpec
from app.keys.health import HealthPolicy
from app.keys.pool import KeyPool, Lease, PoolUpstream, Shortage
from app.keys.store import FailoverStore, MemoryStore, RedisStore
from app.shared_state.factory import open_redis
from tests.support.redis_server import PrivateRedis

SECRETS = ("sk-store-secret-one-1111", "sk-store-secret-two-2222")
SPECS = tuple(
    KeySpec(id=f"up#{n}", secret=SecretStr(secret)) for n, secret in enumerate(SECRETS, 1)
)


def namespace() -> str:
    return "t-" + uuid.uuid4().hex[:12]


def run_with_redis(url: str, body: Callable[[aioredis.Redis], Awaitable[None]]) -> None:
    async def main() -> None:
        client = open_redis(url, timeout=1.0)
        try:
            await body(client)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_store_cooldown_through_one_pool_is_honoured_by_another(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        ns = namespace()
        one = KeyPool([PoolUpstream("up", SPECS)], RedisStore(client, ns))
        two = KeyPool([PoolUpstream("up", SPECS)], RedisStore(client, ns))
        lease = await one.acquire("up")
        assert isinstance(lease, Lease) and lease.key is not None
        await one.report_failure(lease, "rate_limited", {"retry-after": "30"})
        lease.release()
        for _ in range(5):
            other = await two.acquire("up")
            assert isinstance(other, Lease) and other.key is not None
            assert other.key.id != lease.key.id
            other.release()

    run_with_redis(redis_url, body)


def test_store_redis_keys_share_a_hash_tag_and_hold_no_secret(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        ns = namespace()
        specs = tuple(spec.model_copy(update={"rpm": 10}) for spec in SPECS)
        pool = KeyPool([PoolUpstream("up", specs)], RedisStore(client, ns))
        for kind in ("rate_limited", "auth"):
            lease = await pool.acquire("up")
            assert isinstance(lease, Lease)
            await pool.report_failure(lease, kind, {})  # type: ignore[arg-type]
            lease.release()
        names = [name.decode() async for name in client.scan_iter(match=f"{ns}:*")]
        assert len(names) == 4  # two health records, two rpm counters
        assert all(name.startswith(f"{ns}:{{pool:up}}:") for name in names)
        for name in names:
            value = await client.get(name)
            for secret in SECRETS:
                assert secret not in name and secret.encode() not in (value or b"")

    run_with_redis(redis_url, body)


def test_store_rpm_cap_is_shared_and_answers_when_the_window_ends(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        ns, now = namespace(), 1_800_000_010.0
        specs = (SPECS[0].model_copy(update={"rpm": 3}),)
        pools = [
            KeyPool([PoolUpstream("up", specs)], RedisStore(client, ns), clock=lambda: now)
            for _ in range(2)
        ]
        lent = 0
        for _ in range(4):
            for pool in pools:
                found = await pool.acquire("up")
                if isinstance(found, Lease):
                    lent += 1
                    found.release()
                else:
                    assert found.rate_limited_until == 1_800_000_060.0  # the next minute
        assert lent == 3

    run_with_redis(redis_url, body)


def test_store_concurrent_updates_are_never_lost(redis_url: str) -> None:
    async def body(client: aioredis.Redis) -> None:
        ns = namespace()
        policy = HealthPolicy(eject_after=1000)
        pools = [
            KeyPool([PoolUpstream("up", SPECS[:1])], RedisStore(client, ns), policy=policy)
            for _ in range(2)
        ]

        async def fail_once(pool: KeyPool) -> None:
            lease = await pool.acquire("up")
            assert isinstance(lease, Lease)
            await pool.report_failure(lease, "server", {})
            lease.release()

        await asyncio.gather(*(fail_once(pools[n % 2]) for n in range(40)))
        (view,) = await pools[0].snapshot()
        assert view["consecutive_failures"] == 40

    run_with_redis(redis_url, body)


def test_store_falls_back_to_memory_logs_once_and_resyncs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = PrivateRedis()
    server.start()
    clock = [0.0]
    redis_errors: list[float] = []

    async def body() -> None:
        client = aioredis.from_url(server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        ns = namespace()
        store = FailoverStore(
            RedisStore(client, ns),
            MemoryStore(),
            clock=lambda: clock[0],
            retry_interval=5.0,
            on_redis_error=lambda: redis_errors.append(clock[0]),
        )
        pool = KeyPool([PoolUpstream("up", SPECS)], store)
        try:
            assert store.describe() == "redis"
            server.stop()
            for _ in range(3):  # requests keep being served from memory
                lease = await pool.acquire("up")
                assert isinstance(lease, Lease) and lease.key is not None
                if lease.key.id == "up#1":
                    await pool.report_failure(lease, "rate_limited", {"retry-after": "60"})
                lease.release()
            assert store.describe() == "memory (redis unreachable)"
            # Counted once per failed attempt, not per request served from memory meanwhile.
            assert redis_errors == [0.0]
            found = await pool.acquire("up")
            assert isinstance(found, Lease) and found.key is not None
            assert found.key.id == "up#2"  # the cooldown holds in memory
            found.release()
            server.start()
            clock[0] += 10  # past the retry interval
            await pool.acquire("up")
            assert store.describe() == "redis"
            # What this replica learnt while Redis was away is now shared.
            other = KeyPool([PoolUpstream("up", SPECS)], RedisStore(client, ns))
            views = {view["id"]: view for view in await other.snapshot()}
            assert views["up#1"]["state"] == "cooling"
        finally:
            await client.aclose()

    caplog.set_level(logging.WARNING, logger="gateway.keys")
    try:
        asyncio.run(body())
    finally:
        server.stop()
    messages = [record.getMessage() for record in caplog.records]
    assert sum("redis unreachable" in message for message in messages) == 1
    assert sum("redis is back" in message for message in messages) == 1
    assert not any(secret in message for message in messages for secret in SECRETS)


def test_pool_shortage_reports_busy_keys_and_upstream_cap() -> None:
    async def body() -> None:
        specs = (SPECS[0].model_copy(update={"max_concurrency": 1}),)
        pool = KeyPool([PoolUpstream("up", specs, max_concurrency=5)], MemoryStore())
        lease = await pool.acquire("up")
        assert isinstance(lease, Lease)
        busy = await pool.acquire("up")
        assert isinstance(busy, Shortage) and busy.busy
        lease.release()
        capped = KeyPool([PoolUpstream("up", SPECS, max_concurrency=1)], MemoryStore())
        held = await capped.acquire("up")
        assert isinstance(held, Lease)
        full = await capped.acquire("up")
        assert isinstance(full, Shortage) and full.busy

    asyncio.run(body())
