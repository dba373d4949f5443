"""Spend budgets against a real Redis: the reservation script never lets parallel requests past a
budget, settlement (the answer's cost, a cache hit's refund, a maybe-billed failure's kept
reservation), team budgets on top of the client's, failing open with Redis down, the worst-case
cost, and the config that names them."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import pytest

from app.config.catalog import ModelPrice
from app.config.settings import load_settings
from app.config.yaml_source import ConfigError
from app.errors import QuotaExceeded, UpstreamFailed, UpstreamTimeout
from app.observability.metrics import GatewayMetrics
from app.tenants.budgets import Budget, Budgets, dollars
from app.tenants.gate import ClientGate, worst_case
from app.tenants.limiter import Limiter, QuotaPeriod
from app.tenants.usage import NANOS_PER_USD, worst_case_cost_nanos
from app.upstream.base import UpstreamAnswer
from tests.fakes.openai_upstream import images_response
from tests.support.constants import CLIENT_KEY, UPSTREAM_KEYS
from tests.support.gateway_config import write_gateway_config
from tests.support.redis_server import PrivateRedis
from tests.support.servers import free_port
from tests.unit.tenants.conftest import catalog, edit_request, fresh_namespace, policy, redis_client

CENTS_4 = 40_000_000  # $0.04 in nano-USD: one flux-kontext-pro image


def usd(value: str) -> int:
    return int(Decimal(value) * NANOS_PER_USD)


def budgets(
    redis_url: str,
    namespace: str,
    *,
    clients: dict[str, Budget] | None = None,
    teams: dict[str, Budget] | None = None,
    team_of: dict[str, str] | None = None,
    refusals: list[tuple[str, str]] | None = None,
) -> Budgets:
    return Budgets(
        redis_client(redis_url),
        namespace=namespace,
        clients=clients or {},
        teams=teams,
        team_of=team_of,
        on_refused=lambda client, limit: (refusals if refusals is not None else []).append(
            (client, limit)
        ),
    )


async def spent(budgets: Budgets, budget: Budget) -> tuple[int, int]:
    day, month = budgets._keys(budget, QuotaPeriod.at(budgets.clock()))
    assert budgets._redis is not None
    values = await budgets._redis.mget([day, month])
    return int(values[0] or 0), int(values[1] or 0)


def test_budgets_parallel_reservations_on_two_replicas_never_overshoot(
    clients_redis_url: str,
) -> None:
    namespace = fresh_namespace()
    team = Budget("client", "team", per_day=usd("1.00"), per_month=usd("5.00"))

    async def scenario() -> tuple[int, int, tuple[int, int]]:
        # Two replicas, each with its own connection, on one Redis.
        replicas = [budgets(clients_redis_url, namespace, clients={"team": team}) for _ in "ab"]

        async def one(number: int) -> bool:
            try:
                await replicas[number % 2].reserve("team", CENTS_4)
            except QuotaExceeded:
                return False
            return True

        admitted = await asyncio.gather(*(one(number) for number in range(60)))
        used = await spent(replicas[0], team)
        for replica in replicas:
            assert replica._redis is not None
            await replica._redis.aclose()
        return sum(admitted), len(admitted) - sum(admitted), used

    admitted, refused, used = asyncio.run(scenario())
    assert (admitted, refused) == (25, 35)  # $1.00 / $0.04, exactly
    assert used == (usd("1.00"), usd("1.00"))


def test_budgets_settle_to_the_cost_refund_a_hit_and_keep_a_maybe_billed_failure(
    clients_redis_url: str,
) -> None:
    own = Budget("client", "team", per_day=usd("0.10"), per_month=None)

    async def scenario() -> list[tuple[int, int]]:
        spend = budgets(clients_redis_url, fresh_namespace(), clients={"team": own})
        seen = []
        answered = await spend.reserve("team", CENTS_4)
        seen.append(await spent(spend, own))  # reserved: the worst case
        await answered.settle(usd("0.01"))  # the answer cost less
        seen.append(await spent(spend, own))
        await answered.settle(usd("0.03"))  # settled once: a second settle changes nothing
        seen.append(await spent(spend, own))
        hit = await spend.reserve("team", CENTS_4)
        await hit.settle(0)  # a cache hit: all given back
        seen.append(await spent(spend, own))
        timed_out = await spend.reserve("team", CENTS_4)
        await timed_out.settle(None)  # the upstream may have billed: kept
        seen.append(await spent(spend, own))
        assert spend._redis is not None
        await spend._redis.aclose()
        return seen

    day = [day for day, _ in asyncio.run(scenario())]
    assert day == [CENTS_4, usd("0.01"), usd("0.01"), usd("0.01"), usd("0.05")]


def test_budgets_refuse_before_the_call_naming_the_budget(clients_redis_url: str) -> None:
    own = Budget("client", "team-a", per_day=usd("0.10"), per_month=None)
    refusals: list[tuple[str, str]] = []

    async def scenario() -> QuotaExceeded:
        spend = budgets(
            clients_redis_url, fresh_namespace(), clients={"team-a": own}, refusals=refusals
        )
        for _ in range(2):
            await (await spend.reserve("team-a", CENTS_4)).settle(CENTS_4)
        with pytest.raises(QuotaExceeded) as caught:
            await spend.reserve("team-a", CENTS_4)
        assert await spent(spend, own) == (usd("0.08"), usd("0.08"))  # nothing reserved
        assert spend._redis is not None
        await spend._redis.aclose()
        return caught.value

    error = asyncio.run(scenario())
    assert error.status_code == 429 and error.code == "insufficient_quota"
    assert error.error_type == "insufficient_quota"
    assert "client 'team-a' is over its daily budget of $0.10" in error.message
    assert "spent $0.08" in error.message and "may cost up to $0.04" in error.message
    assert error.headers["x-should-retry"] == "false"
    assert 1 <= int(error.headers["retry-after"]) <= 86400
    assert refusals == [("team-a", "budget_usd_per_day")]


def test_budgets_a_team_budget_is_shared_and_its_refusal_gives_the_member_back(
    clients_redis_url: str,
) -> None:
    alice = Budget("client", "alice", per_day=usd("1.00"), per_month=None)
    design = Budget("team", "design", per_day=None, per_month=usd("0.10"))
    refusals: list[tuple[str, str]] = []

    async def scenario() -> tuple[str, tuple[int, int], tuple[int, int]]:
        spend = budgets(
            clients_redis_url,
            fresh_namespace(),
            clients={"alice": alice},
            teams={"design": design},
            team_of={"alice": "design", "bob": "design"},
            refusals=refusals,
        )
        await (await spend.reserve("alice", CENTS_4)).settle(CENTS_4)
        await (await spend.reserve("bob", CENTS_4)).settle(CENTS_4)  # bob: the team's only
        with pytest.raises(QuotaExceeded) as caught:
            await spend.reserve("alice", CENTS_4)
        used = await spent(spend, alice), await spent(spend, design)
        assert spend._redis is not None
        await spend._redis.aclose()
        return caught.value.message, *used

    message, alice_used, team_used = asyncio.run(scenario())
    assert "team 'design' (of client 'alice') is over its monthly budget of $0.10" in message
    # Alice's own reservation was made first, then given back when the team refused.
    assert alice_used == (CENTS_4, CENTS_4)
    assert team_used == (usd("0.08"), usd("0.08"))
    assert refusals == [("alice", "team_budget_usd_per_month")]


def test_budgets_fail_open_when_redis_is_down_and_spend_catches_up() -> None:
    port = free_port()
    own = Budget("client", "team", per_day=usd("0.10"), per_month=None)

    async def scenario() -> None:
        errors: list[str] = []
        spend = Budgets(
            redis_client(f"redis://127.0.0.1:{port}/0"),
            namespace="ns",
            clients={"team": own},
            on_store_error=errors.append,
        )
        # Nothing listens: every request is let through, and the failure is counted.
        for _ in range(3):
            await (await spend.reserve("team", CENTS_4)).settle(CENTS_4)
        assert errors and set(errors) == {"client_limits"}
        server = PrivateRedis(port=port)
        server.start()
        try:
            # Redis is back: the $0.12 spent meanwhile is added first; the budget is spent.
            with pytest.raises(QuotaExceeded):
                await spend.reserve("team", CENTS_4)
            assert await spent(spend, own) == (usd("0.12"), usd("0.12"))
        finally:
            assert spend._redis is not None
            await spend._redis.aclose()
            server.stop()

    asyncio.run(scenario())


def test_budgets_used_ratios_and_the_gauges(clients_redis_url: str) -> None:
    metrics = GatewayMetrics(models=("m",), clients=("team", "free"))
    metrics.show_known_series_at_zero(
        routes=(), served_models={}, clients=("team", "free"), redis=True, teams=("design",)
    )
    text = metrics.scrape().decode()
    for line in (
        'gateway_client_budget_used_ratio{client="team",period="day"} 0.0',
        'gateway_client_budget_used_ratio{client="free",period="month"} 0.0',
        'gateway_team_budget_used_ratio{period="day",team="design"} 0.0',
        'gateway_client_saved_usd_total{client="team",model="m"} 0.0',
    ):
        assert line in text

    async def scenario() -> None:
        spend = budgets(
            clients_redis_url,
            fresh_namespace(),
            clients={"team": Budget("client", "team", per_day=usd("0.10"), per_month=usd("1"))},
            teams={"design": Budget("team", "design", per_day=usd("0.16"), per_month=None)},
            team_of={"team": "design"},
        )
        metrics.watch_budgets(spend.used_ratios)
        await (await spend.reserve("team", CENTS_4)).settle(CENTS_4)
        await metrics.refresh_budgets()
        assert spend._redis is not None
        await spend._redis.aclose()

    asyncio.run(scenario())
    ratio = metrics.registry.get_sample_value
    assert ratio("gateway_client_budget_used_ratio", {"client": "team", "period": "day"}) == 0.4
    assert ratio("gateway_client_budget_used_ratio", {"client": "team", "period": "month"}) == 0.04
    assert ratio("gateway_team_budget_used_ratio", {"team": "design", "period": "day"}) == 0.25
    # A client without a budget reads 0: spend over no budget.
    assert ratio("gateway_client_budget_used_ratio", {"client": "free", "period": "day"}) == 0.0


def answer(n: int) -> UpstreamAnswer:
    return UpstreamAnswer(body=images_response(n), request_id=None)


def test_gate_reserves_before_the_call_and_settles_after(clients_redis_url: str) -> None:
    """Through MeteredEdit, as the service uses it: a hit and an unbilled failure give the
    reservation back, a maybe-billed failure keeps it, a refusal gives the image charge back."""
    own = Budget("client", "team", per_day=usd("0.10"), per_month=None)

    async def scenario() -> tuple[list[int], int]:
        redis = redis_client(clients_redis_url)
        namespace = fresh_namespace()
        spend = Budgets(redis, namespace=namespace, clients={"team": own})
        limiter = Limiter(redis, namespace=namespace)
        metrics = GatewayMetrics(models=catalog().models, clients=["team"])
        gate = ClientGate(limiter, None, metrics, spend)
        team = policy("team", images_per_day=100)
        seen: list[int] = []

        async with gate.enter(team, "hit") as metered:
            flux = edit_request("flux-kontext-pro")
            await metered.charge(flux)
            await metered.answered(flux, answer(1).body, cache_hit=True)
        seen.append((await spent(spend, own))[0])
        async with gate.enter(team, "server") as metered:
            flux = edit_request("flux-kontext-pro")
            await metered.charge(flux)
            await metered.failed(flux, UpstreamFailed("HTTP 500", failure="server"))
        seen.append((await spent(spend, own))[0])
        async with gate.enter(team, "timeout") as metered:
            flux = edit_request("flux-kontext-pro")
            await metered.charge(flux)
            await metered.failed(flux, UpstreamTimeout("late", failure="timeout"))
        seen.append((await spent(spend, own))[0])
        async with gate.enter(team, "ok") as metered:
            flux = edit_request("flux-kontext-pro")
            await metered.charge(flux)
            await metered.answered(flux, answer(1).body)
        seen.append((await spent(spend, own))[0])
        async with gate.enter(team, "over") as metered:
            with pytest.raises(QuotaExceeded):
                await metered.charge(edit_request("flux-kontext-pro"))
        used = await limiter.quota_used("team")
        assert used is not None
        saved = metrics.registry.get_sample_value(
            "gateway_client_saved_usd_total", {"client": "team", "model": "flux-kontext-pro"}
        )
        assert saved == pytest.approx(0.04)
        await redis.aclose()
        return seen, used["images_today"]

    seen, images_today = asyncio.run(scenario())
    assert seen == [0, 0, CENTS_4, 2 * CENTS_4]
    # Images: the hit and the server error given back, the timeout and the answer kept; the
    # refused request's image charge given back too.
    assert images_today == 2


def test_worst_case_cost_from_the_catalog() -> None:
    models = catalog().models
    assert worst_case(edit_request("flux-kontext-pro", n=3)) == 3 * CENTS_4
    price = ModelPrice(
        per_million_input_tokens=Decimal(5),
        per_million_image_input_tokens=Decimal(8),
        per_million_output_tokens=Decimal(30),
        max_input_tokens_per_image=1000,
        max_output_tokens_per_image=2000,
    )
    # 2 images x (2000 + 2 partials x 100) output tokens at $30/M, 3 input images x 1000 at
    # $8/M, 10 prompt bytes at $5/M.
    nanos = worst_case_cost_nanos(price, n=2, input_images=3, prompt_bytes=10, partial_images=2)
    assert nanos == usd("0.132") + usd("0.024") + usd("0.00005")
    gpt = edit_request("gpt-image-1")  # one input image, a one-byte prompt, n=1
    assert models["gpt-image-1"].price.max_output_tokens_per_image == 6240
    assert worst_case(gpt) == usd("0.2496") + usd("0.0624") + usd("0.00001")
    assert worst_case(edit_request("dall-e-2")) == usd("0.02")


def test_dollars_show_cents_and_no_more_than_needed() -> None:
    assert dollars(usd("0.1")) == "$0.10"
    assert dollars(usd("12.5")) == "$12.50"
    assert dollars(usd("0.0004")) == "$0.0004"
    assert dollars(0) == "$0.00"


def settings_with(tmp_path: Path, clients: dict[str, object], *, redis: bool = True) -> object:
    config = write_gateway_config(
        tmp_path, clients=clients, **({"redis_url": "redis://127.0.0.1:1/0"} if redis else {})
    )
    return load_settings(
        env={
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        }
    )


def test_budget_config_is_validated(tmp_path: Path) -> None:
    settings = settings_with(
        tmp_path,
        {
            "default_limits": {"budget_usd_per_day": 20},
            "named": {"alice": {"limits": {"budget_usd_per_day": 0.1}}},
            "teams": {"design": {"members": ["alice", "client-1"], "budget_usd_per_month": 50}},
        },
    )
    clients = settings.clients  # type: ignore[attr-defined]
    assert clients.named["alice"].limits.budget_usd_per_day == Decimal("0.1")
    assert clients.team_of("client-1") == "design" and clients.team_of("alice") == "design"

    problems = {
        "unknown member": (
            {"teams": {"design": {"members": ["nobody"]}}},
            "clients.teams.design.members: 'nobody' is not a client",
        ),
        "two teams": (
            {
                "named": {"alice": {}},
                "teams": {"a": {"members": ["alice"]}, "b": {"members": ["alice"]}},
            },
            "clients.teams.b.members: 'alice' is already a member of team 'a'",
        ),
        "negative budget": (
            {"named": {"alice": {"limits": {"budget_usd_per_day": -1}}}},
            "clients.named.alice.limits.budget_usd_per_day",
        ),
        "bad team name": ({"teams": {"Design Team": {"members": ["client-1"]}}}, "team names"),
        "no members": ({"teams": {"design": {"members": []}}}, "clients.teams.design.members"),
    }
    for name, (clients_section, expected) in problems.items():
        with pytest.raises(ConfigError) as caught:
            settings_with(tmp_path, clients_section)
        assert expected in str(caught.value), name
        assert str(caught.value).startswith(str(tmp_path / "gateway.yaml")), name
    with pytest.raises(ConfigError) as caught:
        settings_with(
            tmp_path,
            {"teams": {"design": {"members": ["client-1"], "budget_usd_per_day": 1}}},
            redis=False,
        )
    assert "no Redis is configured" in str(caught.value)
