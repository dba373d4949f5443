"""Per-client limits against a real Redis: exact sliding windows, weighted images, concurrency
leases, quotas with give-back, one hash tag per client, and failing open when Redis is down."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from app.errors import InvalidRequest, QuotaExceeded, RateLimited
from app.tenants.limiter import Limiter, QuotaPeriod
from tests.support.redis_server import PrivateRedis
from tests.support.servers import free_port
from tests.unit.tenants.conftest import fresh_namespace, policy, redis_client


def request_id() -> str:
    return "req_" + secrets.token_hex(6)


def test_limiter_requests_per_minute_refuses_the_sixth_with_retry_after(
    clients_redis_url: str,
) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        refused: list[tuple[str, str]] = []
        limiter = Limiter(
            redis,
            namespace=fresh_namespace(),
            on_refused=lambda c, limit: refused.append((c, limit)),
        )
        team = policy("team", requests_per_minute=5)
        for _ in range(5):
            await (await limiter.admit(team, request_id())).release()
        with pytest.raises(RateLimited) as caught:
            await limiter.admit(team, request_id())
        error = caught.value
        assert error.status_code == 429 and error.code == "rate_limit_exceeded"
        assert "5 requests per minute" in error.message
        assert 55 <= int(error.headers["retry-after"]) <= 60
        assert refused == [("team", "requests_per_minute")]
        # Refused attempts are not counted: another client, same limits, is untouched.
        await limiter.admit(policy("other", requests_per_minute=5), request_id())
        await redis.aclose()

    asyncio.run(scenario())


def test_limiter_images_per_minute_counts_n(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        limiter = Limiter(redis, namespace=fresh_namespace())
        team = policy(images_per_minute=10)
        first = await limiter.admit(team, request_id())
        await first.take_images(4)
        second = await limiter.admit(team, request_id())
        await second.take_images(6)
        third = await limiter.admit(team, request_id())
        with pytest.raises(RateLimited) as caught:
            await third.take_images(1)
        assert "10 images per minute" in caught.value.message
        assert "images_per_minute" in caught.value.message
        # n above the limit itself can never pass: a 400 naming n, not a retryable 429.
        with pytest.raises(InvalidRequest) as too_many:
            await third.take_images(11)
        assert too_many.value.param == "n" and too_many.value.status_code == 400
        await redis.aclose()

    asyncio.run(scenario())


def test_limiter_failed_call_gives_images_back(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        limiter = Limiter(redis, namespace=fresh_namespace())
        team = policy(images_per_minute=4, images_per_day=4, images_per_month=100)
        slot = await limiter.admit(team, request_id())
        await slot.take_images(4)
        await slot.settle(0)  # the upstream made nothing
        partly = await limiter.admit(team, request_id())
        await partly.take_images(4)
        await partly.settle(1)  # asked for 4, got 1: 3 come back to the quotas
        last = await limiter.admit(team, request_id())
        await last.take_images(3)
        with pytest.raises(QuotaExceeded) as caught:
            await (await limiter.admit(team, request_id())).take_images(1)
        assert caught.value.code == "insufficient_quota"
        assert "used 4 of its 4 images this day" in caught.value.message
        period = QuotaPeriod.at(limiter.clock())
        month = await redis.get(f"{limiter._key('team', 'images:month:' + period.month)}")
        assert int(month) == 4
        await redis.aclose()

    asyncio.run(scenario())


def test_limiter_monthly_quota(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        limiter = Limiter(redis, namespace=fresh_namespace())
        team = policy(images_per_day=100, images_per_month=3)
        await (await limiter.admit(team, request_id())).take_images(3)
        with pytest.raises(QuotaExceeded) as caught:
            await (await limiter.admit(team, request_id())).take_images(1)
        assert "images this month" in caught.value.message
        assert int(caught.value.headers["retry-after"]) > 0
        await redis.aclose()

    asyncio.run(scenario())


def test_limiter_concurrency_slots_are_released_and_crashed_leases_lapse(
    clients_redis_url: str,
) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        limiter = Limiter(redis, namespace=namespace)
        team = policy(concurrent_requests=2)
        first = await limiter.admit(team, request_id())
        second = await limiter.admit(team, request_id())
        with pytest.raises(RateLimited) as caught:
            await limiter.admit(team, request_id())
        assert "2 concurrent requests" in caught.value.message
        await first.release()
        third = await limiter.admit(team, request_id())
        await second.release()
        await third.release()

        # A replica that dies holding slots: its leases lapse without anyone releasing them.
        crashing = Limiter(redis, namespace=namespace, lease_seconds=0.3)
        held = [await crashing.admit(team, request_id()) for _ in range(2)]
        for slot in held:
            assert slot._renewal is not None
            slot._renewal.cancel()  # the process is gone: nobody renews
        with pytest.raises(RateLimited):
            await limiter.admit(team, request_id())
        await asyncio.sleep(0.5)
        await (await limiter.admit(team, request_id())).release()
        await redis.aclose()

    asyncio.run(scenario())


def test_limiter_lease_is_renewed_while_the_request_runs(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        limiter = Limiter(redis, namespace=fresh_namespace(), lease_seconds=0.3)
        team = policy(concurrent_requests=1)
        running = await limiter.admit(team, request_id())
        await asyncio.sleep(0.7)  # longer than the lease: only renewal keeps the slot held
        with pytest.raises(RateLimited):
            await limiter.admit(team, request_id())
        await running.release()
        await (await limiter.admit(team, request_id())).release()
        await redis.aclose()

    asyncio.run(scenario())


def test_limiter_keys_of_one_client_share_a_hash_tag(clients_redis_url: str) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        limiter = Limiter(redis, namespace=namespace)
        team = policy(
            "team-a",
            requests_per_minute=10,
            images_per_minute=10,
            concurrent_requests=5,
            images_per_day=10,
            images_per_month=10,
        )
        slot = await limiter.admit(team, request_id())
        await slot.take_images(2)
        keys = sorted([key.decode() async for key in redis.scan_iter(match=f"{namespace}:*")])
        assert len(keys) == 5
        assert all(key.startswith(f"{namespace}:{{client:team-a}}:") for key in keys)
        await slot.release()
        await redis.aclose()

    asyncio.run(scenario())


def test_limiter_fails_open_when_redis_is_down_and_quota_catches_up() -> None:
    port = free_port()

    async def scenario() -> None:
        redis = redis_client(f"redis://127.0.0.1:{port}/0")
        errors: list[str] = []
        limiter = Limiter(redis, namespace="ns", on_store_error=errors.append)
        team = policy(requests_per_minute=1, concurrent_requests=1, images_per_day=5)
        # Nothing listens: every limit fails open, and says so.
        for _ in range(3):
            slot = await limiter.admit(team, request_id())
            await slot.take_images(2)
            await slot.settle(2)
            await slot.release()
        assert errors and set(errors) == {"client_limits"}

        server = PrivateRedis(port=port)
        server.start()
        try:
            # Redis is back: the 6 images charged during the outage are added first, so the
            # daily quota of 5 is already used up.
            slot = await limiter.admit(team, request_id())
            with pytest.raises(QuotaExceeded):
                await slot.take_images(1)
            period = QuotaPeriod.at(limiter.clock())
            assert int(await redis.get(limiter._key("team", f"images:day:{period.day}"))) == 6
        finally:
            await redis.aclose()
            server.stop()

    asyncio.run(scenario())
