"""The gate around one edit, against a real Redis: usage per client/model/day including cache
hits and costs, client-labelled counters, and usage kept through a Redis outage."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from app.errors import (
    GatewayError,
    PermissionDenied,
    QuotaExceeded,
    UpstreamFailed,
    UpstreamTimeout,
)
from app.intake.request import EditRequest
from app.observability.metrics import GatewayMetrics
from app.tenants.gate import ClientGate, MeteredEdit
from app.tenants.limiter import Limiter
from app.tenants.usage import Usage, UsageLedger
from app.upstream.base import UpstreamAnswer
from tests.fakes.openai_upstream import images_response
from tests.support.redis_server import PrivateRedis
from tests.support.servers import free_port
from tests.unit.tenants.conftest import catalog, edit_request, fresh_namespace, policy, redis_client


def answer(n: int) -> UpstreamAnswer:
    return UpstreamAnswer(body=images_response(n), request_id=None)


async def forward(
    metered: MeteredEdit,
    edit: EditRequest,
    send: Callable[[EditRequest], Awaitable[tuple[UpstreamAnswer, str]]],
) -> tuple[UpstreamAnswer, str]:
    """The gate around an upstream call with no cache in between: charge the images, call, and
    keep the charge only for what the upstream made."""
    await metered.charge(edit)
    try:
        answer, upstream = await send(edit)
    except GatewayError as exc:
        await metered.failed(edit, exc)
        raise
    await metered.answered(edit, answer.body)
    return answer, upstream


def gateway_metrics() -> GatewayMetrics:
    return GatewayMetrics(models=catalog().models, clients=["team", "designers"])


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value if value is not None else 0.0


def test_gate_usage_counts_upstream_edits_cache_hits_errors_and_costs(
    clients_redis_url: str,
) -> None:
    metrics = gateway_metrics()

    async def scenario() -> dict[str, Any]:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        ledger = UsageLedger(redis, namespace=namespace)
        gate = ClientGate(Limiter(redis, namespace=namespace), ledger, metrics)
        team = policy("team", images_per_day=100)

        async def ok(edit: EditRequest) -> tuple[UpstreamAnswer, str]:
            return answer(edit.n), "default"

        async def broken(edit: EditRequest) -> tuple[UpstreamAnswer, str]:
            raise UpstreamFailed("boom")

        async with gate.enter(team, "req_1") as metered:
            await forward(metered, edit_request("gpt-image-1", n=2), ok)
        async with gate.enter(team, "req_2") as metered:
            await forward(metered, edit_request("flux-kontext-pro", n=1), ok)
        async with gate.enter(team, "req_3") as metered:
            cached = edit_request("flux-kontext-pro", n=2)
            await metered.charge(cached)
            await metered.answered(cached, answer(2).body, cache_hit=True)
        async with gate.enter(team, "req_4") as metered:
            with pytest.raises(UpstreamFailed):
                await forward(metered, edit_request("gpt-image-1"), broken)
        today = datetime.now(UTC).date()
        report = await ledger.report(["team", "nobody"], today, today)
        await redis.aclose()
        return report

    report = asyncio.run(scenario())
    rows = {row["model"]: row for row in report["data"]}
    assert {row["client"] for row in report["data"]} == {"team"}
    png_bytes = len(edit_request().images[0].upload.read_all())
    gpt = rows["gpt-image-1"]
    assert (gpt["requests"], gpt["images"], gpt["errors"], gpt["cache_hits"]) == (1, 2, 1, 0)
    assert (gpt["input_tokens"], gpt["output_tokens"], gpt["total_tokens"]) == (50, 100, 150)
    assert gpt["input_bytes"] == 2 * png_bytes
    # gpt-image-1: $10 / M input tokens, $40 / M output tokens.
    assert Decimal(str(gpt["cost_usd"])) == Decimal("0.0005") + Decimal("0.004")
    flux = rows["flux-kontext-pro"]
    assert (flux["requests"], flux["images"], flux["cache_hits"]) == (2, 1, 1)
    assert (flux["cached_images"], flux["upstream_calls_saved"]) == (2, 1)
    assert Decimal(str(flux["cost_usd"])) == Decimal("0.04")  # one image at $0.04
    assert Decimal(str(flux["saved_usd"])) == Decimal("0.08")  # two cached images
    # What the hit's answer reported spending upstream, counted as saved, never as used.
    assert (flux["saved_input_tokens"], flux["saved_output_tokens"]) == (50, 100)
    assert (flux["input_tokens"], flux["output_tokens"]) == (50, 100)  # the paid edit's only
    assert (gpt["saved_input_tokens"], gpt["saved_output_tokens"]) == (0, 0)
    assert report["totals"]["requests"] == 3 and report["totals"]["cache_hits"] == 1

    requests = "gateway_client_requests_total"
    assert sample(metrics, requests, client="team", model="gpt-image-1", outcome="ok") == 1
    assert sample(metrics, requests, client="team", model="gpt-image-1", outcome="error") == 1
    assert (
        sample(metrics, requests, client="team", model="flux-kontext-pro", outcome="cache_hit") == 1
    )
    images = "gateway_client_images_total"
    assert sample(metrics, images, client="team", model="flux-kontext-pro", source="cache") == 2
    assert sample(metrics, images, client="team", model="gpt-image-1", source="upstream") == 2
    cost = sample(metrics, "gateway_client_cost_usd_total", client="team", model="gpt-image-1")
    assert cost == pytest.approx(0.0045)
    saved = sample(
        metrics, "gateway_client_saved_usd_total", client="team", model="flux-kontext-pro"
    )
    assert saved == pytest.approx(0.08)


def test_gate_cache_hits_do_not_use_quota_and_timeouts_keep_the_charge(
    clients_redis_url: str,
) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        gate = ClientGate(Limiter(redis, namespace=namespace), None, gateway_metrics())
        team = policy("team", images_per_day=2)

        async def slow(edit: EditRequest) -> tuple[UpstreamAnswer, str]:
            # The upstream may still be making (and billing) the images.
            raise UpstreamTimeout("late", failure="timeout")  # as the OpenAI dialect tags it

        for number in range(3):
            async with gate.enter(team, f"req_c{number}") as metered:
                cached = edit_request(n=2)
                await metered.charge(cached)  # charged like any edit...
                await metered.answered(cached, answer(2).body, cache_hit=True)  # ...given back
        async with gate.enter(team, "req_t") as metered:
            with pytest.raises(UpstreamTimeout):
                await forward(metered, edit_request(n=2), slow)
        async with gate.enter(team, "req_after") as metered:
            with pytest.raises(QuotaExceeded):
                await forward(metered, edit_request(n=1), slow)
        await redis.aclose()

    asyncio.run(scenario())


def test_gate_keeps_the_charge_only_when_the_upstream_may_have_billed(
    clients_redis_url: str,
) -> None:
    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        gate = ClientGate(Limiter(redis, namespace=fresh_namespace()), None, gateway_metrics())
        team = policy("team", images_per_day=2)

        async def server_error(edit: EditRequest) -> tuple[UpstreamAnswer, str]:
            raise UpstreamFailed("HTTP 500", failure="server")  # nothing was made

        async def unusable(edit: EditRequest) -> tuple[UpstreamAnswer, str]:
            # A 200 the gateway could not use: the upstream made, and billed, the images.
            raise UpstreamFailed("not an ImagesResponse", failure="bad_response")

        async def ok(edit: EditRequest) -> tuple[UpstreamAnswer, str]:
            return answer(edit.n), "default"

        async with gate.enter(team, "req_s") as metered:
            with pytest.raises(UpstreamFailed):
                await forward(metered, edit_request(n=2), server_error)  # given back
        async with gate.enter(team, "req_b") as metered:
            with pytest.raises(UpstreamFailed):
                await forward(metered, edit_request(n=2), unusable)  # kept: 2 of 2 used
        async with gate.enter(team, "req_after") as metered:
            with pytest.raises(QuotaExceeded):
                await forward(metered, edit_request(n=1), ok)
        await redis.aclose()

    asyncio.run(scenario())


def test_gate_refuses_a_model_the_client_may_not_use(clients_redis_url: str) -> None:
    metrics = gateway_metrics()

    async def scenario() -> None:
        redis = redis_client(clients_redis_url)
        gate = ClientGate(Limiter(redis, namespace=fresh_namespace()), None, metrics)
        flux_only = policy("designers", models={"flux-kontext-pro"})

        async def never(edit: EditRequest) -> tuple[UpstreamAnswer, str]:
            raise AssertionError("a refused edit must not reach the upstream")

        async with gate.enter(flux_only, "req_x") as metered:
            with pytest.raises(PermissionDenied) as caught:
                await forward(metered, edit_request("gpt-image-1"), never)
        assert caught.value.status_code == 403 and caught.value.param == "model"
        await redis.aclose()

    asyncio.run(scenario())
    assert (
        sample(
            metrics, "gateway_client_refusals_total", client="designers", limit="model_not_allowed"
        )
        == 1
    )


def test_usage_ledger_catches_up_after_redis_outage() -> None:
    port = free_port()

    async def scenario() -> None:
        redis = redis_client(f"redis://127.0.0.1:{port}/0")
        errors: list[str] = []
        ledger = UsageLedger(redis, namespace="ns", on_store_error=errors.append)
        await ledger.record("team", "gpt-image-1", Usage(requests=1, images=2))
        await ledger.record("team", "gpt-image-1", Usage(requests=1, images=1))
        assert errors == ["client_usage", "client_usage"]
        server = PrivateRedis(port=port)
        server.start()
        try:
            await ledger.record("team", "gpt-image-1", Usage(requests=1, images=4))
            today = datetime.now(UTC).date()
            report = await ledger.report(["team"], today, today)
            (row,) = report["data"]
            assert (row["requests"], row["images"]) == (3, 7)
        finally:
            await redis.aclose()
            server.stop()

    asyncio.run(scenario())
