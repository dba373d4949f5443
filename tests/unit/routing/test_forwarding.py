"""The routing and retry policy, with in-process upstreams that fail as scripted."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable

import pytest
from pydantic import SecretStr

from app.config.catalog import ModelRule
from app.config.settings import KeySpec, RetryConfig
from app.errors import FailureKind, GatewayError, RateLimited, UpstreamFailed, UpstreamTimeout
from app.intake.request import EditRequest
from app.keys.health import KeyHealth
from app.keys.pool import KeyPool, PoolUpstream
from app.keys.store import MemoryStore
from app.observability.metrics import GatewayMetrics
from app.routing.forwarder import Forwarder, Route
from app.upstream.base import PartialSink, UpstreamAnswer, UpstreamKey
from tests.support.prom import total

ANSWER = UpstreamAnswer(body={"created": 1, "data": []}, request_id=None)


def failure(kind: FailureKind) -> GatewayError:
    if kind == "rate_limited":
        return RateLimited("limited", failure=kind)
    if kind == "timeout":
        return UpstreamTimeout("slow", failure=kind)
    return UpstreamFailed(kind, failure=kind)


class ScriptedUpstream:
    """Answers per key: a failure kind raises it, None answers, a float sleeps first."""

    def __init__(self, name: str, script: Callable[[str], FailureKind | float | None]) -> None:
        self.name = name
        self.script = script
        self.calls: list[str] = []

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        key_id = key.id if key else "-"
        self.calls.append(key_id)
        outcome = self.script(key_id)
        if isinstance(outcome, float):
            await asyncio.sleep(outcome)
            outcome = "connect"
        if outcome is not None:
            raise failure(outcome)
        return ANSWER


def specs(upstream: str, count: int) -> tuple[KeySpec, ...]:
    return tuple(
        KeySpec(id=f"{upstream}#{n}", secret=SecretStr(f"sk-{upstream}-{n}-secret"))
        for n in range(1, count + 1)
    )


def make_edit(upstreams: tuple[str, ...], **rules: object) -> EditRequest:
    model = ModelRule(name="m", upstream_model="m", upstreams=upstreams, **rules)  # type: ignore[arg-type]
    return EditRequest(
        model=model,
        prompt="x",
        images=(),
        mask=None,
        params={},
        extra_fields=(),
        response_format=None,
        n=1,
    )


def forwarder(
    upstreams: list[ScriptedUpstream],
    keys: int = 3,
    routes: dict[str, Route] | None = None,
    retry: RetryConfig | None = None,
    seed: int = 1,
) -> Forwarder:
    pool = KeyPool([PoolUpstream(u.name, specs(u.name, keys)) for u in upstreams], MemoryStore())
    return Forwarder(
        {u.name: u for u in upstreams},
        pool,
        metrics=GatewayMetrics(models=("m",)),
        routes=routes,
        retry=retry,
        rng=random.Random(seed).random,
    )


def test_forwarder_splits_a_tier_by_weight() -> None:
    heavy, light = (
        ScriptedUpstream("heavy", lambda _: None),
        ScriptedUpstream("light", lambda _: None),
    )
    routes = {"heavy": Route(weight=3), "light": Route(weight=1)}
    forward = forwarder([heavy, light], routes=routes)
    edit = make_edit(("heavy", "light"))

    async def run() -> Counter[str]:
        return Counter([(await forward.edit(edit))[1] for _ in range(400)])

    served = asyncio.run(run())
    assert 250 < served["heavy"] < 350 and served["heavy"] + served["light"] == 400


def test_forwarder_attempts_are_bounded() -> None:
    limited = ScriptedUpstream("up", lambda _: "rate_limited")
    forward = forwarder([limited], keys=6, retry=RetryConfig(max_attempts=4))
    with pytest.raises(RateLimited) as caught:
        asyncio.run(forward.edit(make_edit(("up",))))
    assert len(limited.calls) == 4
    assert caught.value.headers["x-should-retry"] == "false"


def test_forwarder_timeout_is_resent_only_when_the_model_allows_it() -> None:
    def script(key: str) -> FailureKind | None:
        return "timeout" if key == "up#1" else None

    strict = ScriptedUpstream("up", script)
    with pytest.raises(UpstreamTimeout) as caught:
        asyncio.run(forwarder([strict]).edit(make_edit(("up",))))
    assert strict.calls == ["up#1"]
    assert caught.value.headers["x-should-retry"] == "false"

    lenient = ScriptedUpstream("up", script)
    answer, _ = asyncio.run(
        forwarder([lenient]).edit(make_edit(("up",), resend_after_timeout=True))
    )
    assert answer is ANSWER and lenient.calls == ["up#1", "up#2"]


def test_forwarder_connect_failure_moves_to_another_key_and_succeeds() -> None:
    flaky = ScriptedUpstream("up", lambda key: "connect" if key == "up#1" else None)
    asyncio.run(forwarder([flaky]).edit(make_edit(("up",))))
    assert flaky.calls == ["up#1", "up#2"]


def test_forwarder_deadline_covers_all_attempts() -> None:
    slow = ScriptedUpstream("up", lambda _: 0.2)  # each attempt: 0.2 s, then a connect error
    forward = forwarder([slow], keys=10, retry=RetryConfig(max_attempts=10, deadline=0.5))
    with pytest.raises(UpstreamTimeout):
        asyncio.run(forward.edit(make_edit(("up",))))
    assert len(slow.calls) == 3  # the third attempt is cut by the deadline


def test_forwarder_non_upstream_errors_are_not_retried() -> None:
    def script(key: str) -> FailureKind | None:
        raise GatewayError("a bug, not an upstream failure")

    broken = ScriptedUpstream("up", script)
    with pytest.raises(GatewayError):
        asyncio.run(forwarder([broken]).edit(make_edit(("up",))))
    assert broken.calls == ["up#1"]


def test_forwarder_sends_to_an_ejected_key_rather_than_answer_503() -> None:
    """Panic routing: one key cools after a 429, the other is ejected; the ejected one serves."""
    up = ScriptedUpstream("up", lambda _: None)
    store = MemoryStore()
    now = time.time()
    store.put("up", "up#1", KeyHealth(cool_until=now + 300))
    store.put("up", "up#2", KeyHealth(ejected_until=now + 300, times_ejected=1))
    metrics = GatewayMetrics(models=("m",))
    forward = Forwarder(
        {"up": up}, KeyPool([PoolUpstream("up", specs("up", 2))], store), metrics=metrics
    )
    answer, _ = asyncio.run(forward.edit(make_edit(("up",))))
    assert answer is ANSWER and up.calls == ["up#2"]
    assert store.get("up", "up#2").usable(time.time())  # it worked: back in rotation
    scrape = metrics.scrape().decode()
    assert total(scrape, "gateway_upstream_ejection_overrides_total", reason="panic") == 1


def test_forwarder_prefers_a_healthy_fallback_tier_to_panic_routing() -> None:
    primary = ScriptedUpstream("primary", lambda _: None)
    secondary = ScriptedUpstream("secondary", lambda _: None)
    routes = {"primary": Route(priority=0), "secondary": Route(priority=1)}
    forward = forwarder([primary, secondary], keys=2, routes=routes)
    store = forward.pool.store
    assert isinstance(store, MemoryStore)
    now = time.time()
    store.put("primary", "primary#1", KeyHealth(cool_until=now + 300))
    store.put("primary", "primary#2", KeyHealth(ejected_until=now + 300, times_ejected=1))
    _, served_by = asyncio.run(forward.edit(make_edit(("primary", "secondary"))))
    assert served_by == "secondary" and not primary.calls


@pytest.mark.parametrize("kind", ["server", "connect"])
def test_forwarder_upstream_failing_on_every_key_is_never_a_503(kind: FailureKind) -> None:
    """An upstream-wide failure is passed on as the upstream's, and ends when the upstream does."""
    failing = [True]
    up = ScriptedUpstream("up", lambda _: kind if failing[0] else None)
    forward = forwarder([up], keys=3)

    async def run() -> list[str]:
        seen = []
        for _ in range(40):
            try:
                await forward.edit(make_edit(("up",)))
            except GatewayError as error:
                seen.append(error.code)
        return seen

    codes = asyncio.run(run())
    assert len(codes) == 40 and "no_upstream_key_available" not in codes
    failing[0] = False
    calls_before = len(up.calls)
    answer, _ = asyncio.run(forward.edit(make_edit(("up",))))
    assert answer is ANSWER and len(up.calls) == calls_before + 1


@pytest.mark.parametrize(("kind", "should_retry"), [("bad_response", None), ("dropped", "false")])
def test_forwarder_tells_the_sdk_not_to_retry_only_when_the_outcome_is_unknown(
    kind: FailureKind, should_retry: str | None
) -> None:
    """An unusable answer was billed but is over; a dropped call may still be running, so a
    retry by the SDK could pay for it twice."""
    failing = ScriptedUpstream("up", lambda _: kind)
    forward = forwarder([failing], keys=1, retry=RetryConfig(server_error_retries=0))
    with pytest.raises(GatewayError) as caught:
        asyncio.run(forward.edit(make_edit(("up",))))
    assert failing.calls == ["up#1"]
    assert caught.value.headers.get("x-should-retry") == should_retry


# A model's upstreams are an ordered fallback (issue 16); weights split only when set.


def test_forwarder_serves_from_the_first_listed_upstream_of_a_tier() -> None:
    first = ScriptedUpstream("first", lambda _: None)
    second = ScriptedUpstream("second", lambda _: None)
    # Same priority, no weights: before issue 16 this tier was split at random.
    forward = forwarder([first, second], routes={"first": Route(), "second": Route()})

    async def run() -> Counter[str]:
        return Counter([(await forward.edit(make_edit(("first", "second"))))[1] for _ in range(50)])

    assert asyncio.run(run()) == Counter({"first": 50})
    assert not second.calls


def test_forwarder_list_order_is_the_models_own() -> None:
    a = ScriptedUpstream("a", lambda _: None)
    b = ScriptedUpstream("b", lambda _: None)
    forward = forwarder([a, b])
    assert asyncio.run(forward.edit(make_edit(("b", "a"))))[1] == "b"
    assert asyncio.run(forward.edit(make_edit(("a", "b"))))[1] == "a"


def test_forwarder_falls_back_in_list_order_when_the_first_fails() -> None:
    down = ScriptedUpstream("down", lambda _: "connect")
    up = ScriptedUpstream("up", lambda _: None)
    forward = forwarder([down, up], keys=1)
    _, served_by = asyncio.run(forward.edit(make_edit(("down", "up"))))
    assert served_by == "up" and down.calls == ["down#1"]


def test_forwarder_priority_still_comes_before_list_order() -> None:
    listed_first = ScriptedUpstream("listed_first", lambda _: None)
    preferred = ScriptedUpstream("preferred", lambda _: None)
    routes = {"listed_first": Route(priority=1), "preferred": Route(priority=0)}
    forward = forwarder([listed_first, preferred], routes=routes)
    assert asyncio.run(forward.edit(make_edit(("listed_first", "preferred"))))[1] == "preferred"


def test_forwarder_one_weight_in_a_tier_asks_for_a_split() -> None:
    first = ScriptedUpstream("first", lambda _: None)
    second = ScriptedUpstream("second", lambda _: None)
    routes = {"first": Route(), "second": Route(weight=1)}  # unset counts as 1: an even split
    forward = forwarder([first, second], routes=routes)

    async def run() -> Counter[str]:
        return Counter(
            [(await forward.edit(make_edit(("first", "second"))))[1] for _ in range(400)]
        )

    served = asyncio.run(run())
    assert 140 < served["second"] < 260 and served["first"] + served["second"] == 400


# A task the upstream accepted was paid for: never submitted again (issue 16).


def test_forwarder_never_retries_an_accepted_task() -> None:
    up = ScriptedUpstream("up", lambda _: "accepted")
    other = ScriptedUpstream("other", lambda _: None)
    forward = forwarder([up, other], keys=3)
    with pytest.raises(GatewayError) as caught:
        asyncio.run(forward.edit(make_edit(("up", "other"), resend_after_timeout=True)))
    assert up.calls == ["up#1"] and not other.calls
    assert caught.value.failure == "accepted"
    assert caught.value.headers["x-should-retry"] == "false"
