"""ShardedTransport: concurrent requests go to separate small pools, and every slot comes back."""

from __future__ import annotations

import asyncio

import httpx

from app.upstream.transport import ShardedTransport
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply


async def _wait_for_edits(upstream: FakeOpenAIUpstream, count: int) -> None:
    async with asyncio.timeout(20):
        while len(upstream.edits) < count:
            await asyncio.sleep(0.01)


def test_sharded_transport_spreads_concurrent_requests_and_releases_slots(
    upstream: FakeOpenAIUpstream,
) -> None:
    transport = ShardedTransport(
        max_connections=4, max_keepalive_connections=4, keepalive_expiry=5, shard_connections=2
    )
    url = upstream.url + "/images/edits"  # type: ignore[attr-defined]
    files = {"image": ("a.png", b"x", "image/png")}

    async def scenario() -> tuple[tuple[int, ...], tuple[int, ...], list[int]]:
        upstream.enqueue(Reply(delay=0.5), Reply(delay=0.5))
        async with httpx.AsyncClient(transport=transport) as client:
            requests = [
                asyncio.create_task(client.post(url, files=files, data={"prompt": "x"}))
                for _ in range(2)
            ]
            await _wait_for_edits(upstream, 2)
            during = transport.in_flight
            responses = await asyncio.gather(*requests)
            after = transport.in_flight
        return during, after, [r.status_code for r in responses]

    during, after, statuses = asyncio.run(scenario())
    assert statuses == [200, 200]
    assert during == (1, 1)  # the least busy pool takes the second request
    assert after == (0, 0)


def test_sharded_transport_splits_configured_totals(upstream: FakeOpenAIUpstream) -> None:
    transport = ShardedTransport(
        max_connections=512, max_keepalive_connections=128, keepalive_expiry=30
    )
    assert transport.in_flight == (0,) * 32

    async def one() -> tuple[int, tuple[int, ...]]:
        async with httpx.AsyncClient(transport=transport) as client:
            response = await client.get(upstream.url + "/models")  # type: ignore[attr-defined]
        return response.status_code, transport.in_flight

    status, after = asyncio.run(one())
    assert status == 200 and after == (0,) * 32
