"""Acceptance 8: a hypothesis state machine drives the pool through leases, outcomes, probes and
time, and checks it never hands out a disabled or cooling key, hands out an ejected one only when
ejection would otherwise empty the upstream (cap, panic), never loses a key, never shortens a
cooldown, shortens an ejection only by a success of a key lent despite it, and that in-flight
counts return to zero."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from pydantic import SecretStr

from app.config.settings import KeySpec
from app.errors import FailureKind
from app.keys.health import HealthPolicy, KeyHealth
from app.keys.outliers import ejection_limit
from app.keys.pool import KeyPool, Lease, PoolUpstream, Shortage
from app.keys.store import MemoryStore

T = TypeVar("T")

SPECS = {
    "a": (
        KeySpec(id="a#1", secret=SecretStr("sk-a1-secret"), max_concurrency=2),
        KeySpec(id="a#2", secret=SecretStr("sk-a2-secret"), rpm=3),
        KeySpec(id="named", secret=SecretStr("sk-a3-secret")),
    ),
    "b": (KeySpec(id="b#1", secret=SecretStr("sk-b1-secret"), max_concurrency=1),),
}
UPSTREAM_CAPS = {"a": 4, "b": None}
POLICY = HealthPolicy(eject_after=3, probe_interval=10.0)
FAILURES: list[FailureKind] = [
    "rate_limited",
    "auth",
    "quota",
    "server",
    "connect",
    "timeout",
    "dropped",
    "rejected",
    "bad_response",
]
HINTS = [
    {},
    {"retry-after": "5"},
    {"retry-after-ms": "1500"},
    {"x-ratelimit-reset-requests": "1m0s"},
    {"retry-after": "garbage"},
]


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.now = 1_800_000_000.0
        self.store = MemoryStore()
        self.pool = KeyPool(
            [PoolUpstream(name, SPECS[name], UPSTREAM_CAPS[name]) for name in SPECS],
            self.store,
            policy=POLICY,
            clock=lambda: self.now,
            rng=random.Random(7).random,
        )
        self.held: list[Lease] = []
        self.cool_until: dict[str, float] = {}
        self.ejected_until: dict[str, float] = {}

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def state(self, upstream: str, key_id: str) -> KeyHealth:
        return self.store.get(upstream, key_id)

    @rule(upstream=st.sampled_from(sorted(SPECS)), exclude_first=st.booleans(), panic=st.booleans())
    def acquire(self, upstream: str, exclude_first: bool, panic: bool) -> None:
        exclude = {SPECS[upstream][0].id} if exclude_first else set()
        result = self.run(self.pool.acquire(upstream, exclude, panic=panic))
        if isinstance(result, Shortage):
            self.check_nothing_was_free(upstream, exclude, panic)
            return
        assert result.key is not None
        key_id = result.key.id
        assert key_id not in exclude
        state = self.state(upstream, key_id)
        if result.override is None:
            assert state.usable(self.now), "lent a key that is not usable"
        else:
            assert panic or result.override == "cap", "panic routing nobody asked for"
            self.check_override_was_needed(upstream, key_id, result.override)
        spec = next(spec for spec in SPECS[upstream] if spec.id == key_id)
        assert result.key.secret == spec.secret
        if spec.max_concurrency is not None:
            assert self.pool.in_flight(upstream, key_id) <= spec.max_concurrency
        cap = UPSTREAM_CAPS[upstream]
        if cap is not None:
            assert self.pool.in_flight(upstream) <= cap
        self.held.append(result)

    def ejected(self, upstream: str) -> list[str]:
        return [
            spec.id
            for spec in SPECS[upstream]
            if (state := self.state(upstream, spec.id)).disabled is None
            and state.ejected_until > self.now
        ]

    def set_aside(self, upstream: str) -> set[str]:
        """Ejected keys beyond the limit (replicas overshot it), the soonest to end first."""
        specs = SPECS[upstream]
        in_service = sum(1 for spec in specs if self.state(upstream, spec.id).disabled is None)
        limit = ejection_limit(len(specs), in_service, POLICY.max_ejected_share)
        ejected = sorted(
            self.ejected(upstream), key=lambda k: self.state(upstream, k).ejected_until
        )
        return {
            key_id
            for key_id in ejected[: max(0, len(ejected) - limit)]
            if self.state(upstream, key_id).cool_until <= self.now
        }

    def panic_routable(self, upstream: str) -> set[str]:
        """Ejected keys panic routing may lend: nothing else serves and they are not cooling."""
        usable = any(self.state(upstream, s.id).usable(self.now) for s in SPECS[upstream])
        if usable or self.set_aside(upstream):
            return set()
        return {k for k in self.ejected(upstream) if self.state(upstream, k).cool_until <= self.now}

    def check_override_was_needed(self, upstream: str, key_id: str, override: str) -> None:
        if override == "panic":
            assert key_id in self.panic_routable(upstream), "panic routing while keys could serve"
        else:
            assert key_id in self.set_aside(upstream), "an ejection within the limit set aside"

    def check_nothing_was_free(self, upstream: str, exclude: set[str], panic: bool) -> None:
        cap = UPSTREAM_CAPS[upstream]
        if cap is not None and self.pool.in_flight(upstream) >= cap:
            return
        lendable = self.set_aside(upstream) | (self.panic_routable(upstream) if panic else set())
        for spec in SPECS[upstream]:
            if spec.id in exclude or spec.rpm is not None:
                continue
            below_cap = (
                spec.max_concurrency is None
                or self.pool.in_flight(upstream, spec.id) < spec.max_concurrency
            )
            usable = self.state(upstream, spec.id).usable(self.now) or spec.id in lendable
            assert not (usable and below_cap), f"no key lent while {spec.id} was free"

    @precondition(lambda self: bool(self.held))
    @rule(
        data=st.data(),
        outcome=st.sampled_from(["success", *FAILURES]),
        hint=st.sampled_from(HINTS),
    )
    def finish(self, data: st.DataObject, outcome: str, hint: dict[str, str]) -> None:
        lease = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        if outcome == "success":
            self.run(self.pool.report_success(lease))
            if lease.override is not None and lease.key is not None:
                # The one way an ejection ends early: a key lent despite it worked.
                self.ejected_until[lease.key.id] = self.state(
                    lease.upstream, lease.key.id
                ).ejected_until
        else:
            self.run(self.pool.report_failure(lease, outcome, hint))  # type: ignore[arg-type]
        lease.release()
        lease.release()  # a second release must not count twice

    @rule(
        upstream=st.sampled_from(sorted(SPECS)),
        data=st.data(),
        seconds=st.floats(1, 300, allow_nan=False),
    )
    def ejected_by_another_replica(
        self, upstream: str, data: st.DataObject, seconds: float
    ) -> None:
        """Another replica's ejection lands in the shared store, past this one's limit maybe."""
        spec = data.draw(st.sampled_from(SPECS[upstream]))
        state = self.state(upstream, spec.id)
        until = max(state.ejected_until, self.now + seconds)
        self.store.put(
            upstream,
            spec.id,
            replace(state, ejected_until=until, times_ejected=state.times_ejected + 1),
        )

    @rule(
        upstream=st.sampled_from(sorted(SPECS)),
        data=st.data(),
        seconds=st.floats(1, 300, allow_nan=False),
    )
    def cooled_by_another_replica(self, upstream: str, data: st.DataObject, seconds: float) -> None:
        """Another replica's 429 cooldown lands in the shared store."""
        spec = data.draw(st.sampled_from(SPECS[upstream]))
        state = self.state(upstream, spec.id)
        until = max(state.cool_until, self.now + seconds)
        self.store.put(upstream, spec.id, replace(state, cool_until=until))

    @rule(seconds=st.floats(0, 120, allow_nan=False))
    def advance(self, seconds: float) -> None:
        self.now += seconds

    @rule(passed=st.booleans())
    def probe(self, passed: bool) -> None:
        for upstream in SPECS:
            for key in self.run(self.pool.claim_probes(upstream)):
                assert self.state(upstream, key.id).disabled is not None
                self.run(self.pool.report_probe(upstream, key.id, passed))
                assert (self.state(upstream, key.id).disabled is None) == passed

    @invariant()
    def never_loses_a_key(self) -> None:
        views = self.run(self.pool.snapshot())
        assert sorted(v["id"] for v in views) == sorted(
            s.id for specs in SPECS.values() for s in specs
        )
        for view in views:
            assert "secret" not in repr(view)

    @invariant()
    def in_flight_counts_match_held_leases(self) -> None:
        per_key = Counter((lease.upstream, lease.key.id) for lease in self.held if lease.key)
        per_upstream = Counter(lease.upstream for lease in self.held)
        for upstream, specs in SPECS.items():
            assert self.pool.in_flight(upstream) == per_upstream[upstream]
            for spec in specs:
                assert self.pool.in_flight(upstream, spec.id) == per_key[(upstream, spec.id)]

    @invariant()
    def cooldowns_and_ejections_never_shorten(self) -> None:
        for upstream, specs in SPECS.items():
            for spec in specs:
                state = self.state(upstream, spec.id)
                assert state.cool_until >= self.cool_until.get(spec.id, 0.0)
                assert state.ejected_until >= self.ejected_until.get(spec.id, 0.0)
                self.cool_until[spec.id] = state.cool_until
                self.ejected_until[spec.id] = state.ejected_until

    def teardown(self) -> None:
        for lease in self.held:
            lease.release()
        self.held.clear()
        try:
            for upstream, specs in SPECS.items():
                assert self.pool.in_flight(upstream) == 0
                for spec in specs:
                    assert self.pool.in_flight(upstream, spec.id) == 0
        finally:
            self.loop.close()


PoolMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_pool_state_machine = PoolMachine.TestCase
