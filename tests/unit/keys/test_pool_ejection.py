"""Ejection that cannot empty the pool: the pool with a fake clock and the memory store, driven
through the outcomes a faulty upstream produces (issue 18)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest
from pydantic import SecretStr

from app.config.settings import KeySpec
from app.errors import FailureKind
from app.keys.health import HealthPolicy, KeyHealth
from app.keys.pool import KeyPool, Lease, PoolUpstream, Shortage
from app.keys.store import MemoryStore

NOW = 1_800_000_000.0
POLICY = HealthPolicy()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def make_pool(keys: int = 3, policy: HealthPolicy = POLICY) -> tuple[KeyPool, MemoryStore, Clock]:
    specs = tuple(
        KeySpec(id=f"k{n}", secret=SecretStr(f"sk-ejection-test-{n}")) for n in range(1, keys + 1)
    )
    store, clock = MemoryStore(), Clock()
    pool = KeyPool([PoolUpstream("up", specs)], store, policy=policy, clock=clock)
    return pool, store, clock


async def lend(pool: KeyPool, exclude: tuple[str, ...] = (), *, panic: bool = False) -> Lease:
    found = await pool.acquire("up", exclude, panic=panic)
    assert isinstance(found, Lease) and found.key is not None, found
    return found


async def call(
    pool: KeyPool, outcome: Callable[[str], FailureKind | None], *, panic: bool = False
) -> Lease:
    """One attempt: lend a key, report what the upstream did with it, release it."""
    lease = await lend(pool, panic=panic)
    assert lease.key is not None
    failure = outcome(lease.key.id)
    if failure is None:
        await pool.report_success(lease)
    else:
        await pool.report_failure(lease, failure, {})
    lease.release()
    return lease


def ejected(store: MemoryStore, clock: Clock, keys: int = 3) -> set[str]:
    return {
        f"k{n}" for n in range(1, keys + 1) if store.get("up", f"k{n}").ejected_until > clock.now
    }


@pytest.mark.parametrize("seed", range(5))
def test_pool_storm_across_every_key_ejects_none(seed: int) -> None:
    """30% of calls fail whatever the key: the upstream's fault, so no key is blamed."""
    pool, store, clock = make_pool()
    rng = random.Random(seed)

    async def body() -> None:
        for _ in range(300):  # a healthy minute before the storm
            clock.now += 0.1
            await call(pool, lambda key: None)
        for _ in range(2000):
            clock.now += 0.01
            await call(pool, lambda key: "server" if rng.random() < 0.3 else None)
            assert not ejected(store, clock)

    asyncio.run(body())


def test_pool_key_failing_alone_is_ejected_and_its_traffic_moves() -> None:
    pool, store, clock = make_pool()

    async def body() -> None:
        for _ in range(40):
            clock.now += 0.1
            await call(pool, lambda key: "server" if key == "k1" else None)
        assert ejected(store, clock) == {"k1"}
        lent = [(await call(pool, lambda key: None)).key for _ in range(10)]
        assert all(key is not None and key.id != "k1" for key in lent)

    asyncio.run(body())


def test_pool_never_ejects_more_than_its_share() -> None:
    """Two of three keys fail (key-specific, the third serves): only one may be out at once."""
    pool, store, clock = make_pool()

    async def body() -> None:
        for _ in range(60):
            clock.now += 0.1
            await call(pool, lambda key: None if key == "k3" else "server")
            assert len(ejected(store, clock)) <= 1
        (out,) = ejected(store, clock)
        kept = ({"k1", "k2"} - {out}).pop()
        # The one kept in has failed well past eject_after: it stays, the limit holds it in.
        assert store.get("up", kept).failures >= POLICY.eject_after
        assert store.get("up", kept).usable(clock.now)

    asyncio.run(body())


def test_pool_share_zero_turns_ejection_off() -> None:
    pool, store, clock = make_pool(policy=HealthPolicy(max_ejected_share=0.0))

    async def body() -> None:
        for _ in range(40):
            clock.now += 0.1
            await call(pool, lambda key: "server" if key == "k1" else None)
        assert not ejected(store, clock)

    asyncio.run(body())


def test_pool_connection_failures_never_eject() -> None:
    pool, store, clock = make_pool()

    async def body() -> None:
        for _ in range(60):
            clock.now += 0.1
            await call(pool, lambda key: "connect")
        assert not ejected(store, clock)
        lease = await lend(pool)  # the upstream is back: the first attempt goes out
        assert lease.override is None

    asyncio.run(body())


def test_pool_panic_lends_ejected_keys_when_the_rest_are_cooling_or_disabled() -> None:
    pool, store, _clock = make_pool(keys=4)
    store.put("up", "k1", KeyHealth(ejected_until=NOW + 30, recent=((NOW - 5, "server"),)))
    store.put("up", "k2", KeyHealth(ejected_until=NOW + 60, recent=((NOW - 1, "server"),)))
    store.put("up", "k3", KeyHealth(cool_until=NOW + 20))
    store.put("up", "k4", KeyHealth(disabled="auth"))

    async def body() -> None:
        # Not asked for panic routing (another upstream of the route may serve): a shortage.
        assert isinstance(await pool.acquire("up"), Shortage)
        first = await lend(pool, panic=True)
        assert (first.key and first.key.id, first.override) == ("k1", "panic")  # failed longest ago
        second = await lend(pool, panic=True)
        assert (second.key and second.key.id, second.override) == ("k2", "panic")  # k1 is busy
        first.release()
        second.release()
        # A request that has tried both ejected keys is told its own failure, not lent k3/k4.
        found = await pool.acquire("up", {"k1", "k2"}, panic=True)
        assert isinstance(found, Shortage) and found.tried == 2 and found.disabled == 1

    asyncio.run(body())


def test_pool_rate_limited_and_disabled_keys_keep_their_meaning() -> None:
    pool, store, _clock = make_pool()
    store.put("up", "k1", KeyHealth(cool_until=NOW + 20))
    store.put("up", "k2", KeyHealth(cool_until=NOW + 10))
    store.put("up", "k3", KeyHealth(disabled="auth"))

    async def body() -> None:
        found = await pool.acquire("up", panic=True)
        # Every key cooling or disabled: a shortage saying when to come back, never a panic.
        assert isinstance(found, Shortage)
        assert found.rate_limited_until == NOW + 10 and found.disabled == 1

    asyncio.run(body())


def test_pool_success_in_panic_brings_the_key_back_at_once() -> None:
    pool, store, clock = make_pool(keys=2)
    store.put("up", "k1", KeyHealth(ejected_until=NOW + 300, times_ejected=3))
    store.put("up", "k2", KeyHealth(cool_until=NOW + 600))

    async def body() -> None:
        clock.now += 1
        lease = await call(pool, lambda key: None, panic=True)
        assert lease.override == "panic"
        assert store.get("up", "k1").usable(clock.now)  # not 299 s more
        again = await lend(pool)
        assert again.override is None

    asyncio.run(body())


def test_pool_last_key_in_service_is_never_out() -> None:
    pool, store, clock = make_pool(keys=2)
    store.put("up", "k1", KeyHealth(ejected_until=NOW + 300, times_ejected=3))
    store.put("up", "k2", KeyHealth(disabled="quota"))

    async def body() -> None:
        lease = await call(pool, lambda key: None)
        assert lease.override == "cap"
        assert store.get("up", "k1").usable(clock.now)

    asyncio.run(body())


def test_pool_overshoot_by_replicas_is_set_aside_at_selection() -> None:
    """Three replicas ejected all three keys at the same instant: two serve anyway."""
    pool, store, _clock = make_pool()
    for n, until in ((1, 30.0), (2, 10.0), (3, 20.0)):
        store.put("up", f"k{n}", KeyHealth(ejected_until=NOW + until))

    async def body() -> None:
        lent = {}
        for _ in range(4):
            lease = await lend(pool)
            assert lease.key is not None
            lent[lease.key.id] = lease.override
            lease.release()
        assert lent == {"k2": "cap", "k3": "cap"}  # k1's ejection ends last: it stays out

    asyncio.run(body())


def test_pool_success_clears_a_streak_built_by_concurrent_calls() -> None:
    """A success ends a failure streak even when its lease was taken before the failures."""
    pool, store, _clock = make_pool(keys=1)

    async def body() -> None:
        slow = await lend(pool)  # a long call starts while the key is clean
        for _ in range(POLICY.eject_after - 1):
            other = await lend(pool)
            await pool.report_failure(other, "server", {})
            other.release()
        assert store.get("up", "k1").failures == POLICY.eject_after - 1
        await pool.report_success(slow)
        slow.release()
        assert store.get("up", "k1").failures == 0

    asyncio.run(body())
