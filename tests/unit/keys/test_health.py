"""The key health state machine, as pure functions of (state, event, now)."""

from __future__ import annotations

import email.utils
from dataclasses import replace

import pytest

from app.keys.health import (
    HealthPolicy,
    KeyHealth,
    after_failure,
    after_probe,
    after_success,
    claim_probe,
    cooldown_hint,
    merge,
    parse_duration,
)

NOW = 1_800_000_000.0
POLICY = HealthPolicy()


def no_jitter() -> float:
    return 0.0


def full_jitter() -> float:
    return 1.0


def fail(state: KeyHealth, kind: str, now: float = NOW, **headers: str) -> KeyHealth:
    hints = {name.replace("_", "-"): value for name, value in headers.items()}
    return after_failure(state, kind, hints, now, POLICY, no_jitter)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after": "30"}, 30.0),
        ({"retry-after-ms": "250", "retry-after": "30"}, 0.25),  # the precise one wins
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-requests": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "1h2m3.5s"}, 3723.5),
        ({"retry-after": "soon"}, None),
        ({"x-ratelimit-reset-requests": "5 parsecs"}, None),
        ({}, None),
    ],
)
def test_cooldown_hint_reads_openai_headers(headers: dict[str, str], seconds: float | None) -> None:
    assert cooldown_hint(headers, NOW) == seconds


def test_cooldown_hint_reads_an_http_date() -> None:
    when = email.utils.formatdate(NOW + 42, usegmt=True)
    assert cooldown_hint({"retry-after": when}, NOW) == pytest.approx(42, abs=1)


def test_parse_duration_rejects_junk_between_parts() -> None:
    assert parse_duration("1m junk 2s") is None
    assert parse_duration("") is None


def test_health_429_cools_for_the_hinted_time() -> None:
    state = fail(KeyHealth(), "rate_limited", retry_after="30")
    assert state.status(NOW + 1) == ("cooling", "rate_limited", 29.0)
    assert not state.usable(NOW + 29.9) and state.usable(NOW + 30)


def test_health_429_without_hint_doubles_up_to_the_max_with_jitter() -> None:
    state, waits = KeyHealth(), []
    for step in range(9):
        now = NOW + step * 1000
        state = fail(state, "rate_limited", now=now)
        waits.append(state.cool_until - now)
    assert waits == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    jittered = after_failure(KeyHealth(), "rate_limited", {}, NOW, POLICY, full_jitter)
    assert jittered.cool_until - NOW == pytest.approx(1 - POLICY.jitter)


def test_health_repeated_429_extends_never_shortens() -> None:
    long = fail(KeyHealth(), "rate_limited", retry_after="30")
    short = fail(long, "rate_limited", now=NOW + 1, retry_after="2")
    assert short.cool_until == long.cool_until
    longer = fail(long, "rate_limited", now=NOW + 10, retry_after="60")
    assert longer.cool_until == NOW + 70


def test_health_hinted_cooldown_is_capped() -> None:
    state = fail(KeyHealth(), "rate_limited", retry_after="999999")
    assert state.cool_until == NOW + POLICY.cooldown_hint_max


@pytest.mark.parametrize("kind", ["auth", "quota"])
def test_health_auth_and_quota_disable_until_a_probe_passes(kind: str) -> None:
    state = fail(KeyHealth(), kind)
    assert state.status(NOW + 10_000) == ("disabled", kind, 0.0)
    assert claim_probe(state, NOW + 1, POLICY) == state  # not due yet
    claimed = claim_probe(state, NOW + POLICY.probe_interval, POLICY)
    assert claimed.next_probe_at == NOW + 2 * POLICY.probe_interval
    assert after_probe(claimed, False, NOW).disabled == kind
    assert after_probe(claimed, True, NOW).usable(NOW)


def test_health_five_consecutive_failures_eject_for_longer_each_time() -> None:
    state = KeyHealth()
    for kind in ("server", "dropped", "timeout", "server"):
        state = fail(state, kind)
        assert state.usable(NOW)
    state = fail(state, "server")
    assert state.status(NOW) == ("ejected", "server", 30.0)
    for _ in range(5):
        state = fail(state, "bad_response", now=NOW + 100)
    assert state.ejected_until == NOW + 100 + 60  # 30 s x times ejected
    for _ in range(20):
        # Ejected again as soon as it is back: nothing is forgiven, the ejections grow.
        again = state.ejected_until + 1
        for _ in range(5):
            state = fail(state, "server", now=again)
    assert state.ejected_until - again == POLICY.eject_max


def test_health_ejections_are_forgiven_after_time_back_in_service() -> None:
    state = KeyHealth()
    for _ in range(4):
        again = max(NOW, state.ejected_until + 1)
        for _ in range(5):
            state = fail(state, "server", now=again)
    assert state.times_ejected == 4
    assert state.ejected_until - again == 4 * POLICY.eject_base
    # Back in service for three eject_max periods: three of the four ejections are forgiven.
    later = state.ejected_until + 3 * POLICY.eject_max + 1
    for _ in range(5):
        state = fail(state, "timeout", now=later)
    assert state.times_ejected == 2
    assert state.ejected_until - later == 2 * POLICY.eject_base
    # Months later it starts over.
    much_later = state.ejected_until + 1_000 * POLICY.eject_max
    for _ in range(5):
        state = fail(state, "dropped", now=much_later)
    assert state.ejected_until - much_later == POLICY.eject_base


def test_health_connection_failures_never_count_against_a_key() -> None:
    # No key was sent: the host is unreachable, whichever key the attempt carried.
    state = KeyHealth()
    for step in range(50):
        state = fail(state, "connect", now=NOW + step)
    assert state.failures == 0 and state.usable(NOW + 50)
    assert state.last_failure == "connect" and len(state.recent) == POLICY.recent_errors


def test_health_failures_the_pool_does_not_blame_on_the_key_leave_its_streak_alone() -> None:
    state = fail(fail(KeyHealth(), "server"), "server")
    for _ in range(20):
        state = after_failure(state, "server", {}, NOW, POLICY, no_jitter, blamed=False)
    assert state.failures == 2 and state.usable(NOW)
    assert [kind for _, kind in state.recent] == ["server"] * POLICY.recent_errors  # still shown


def test_health_at_the_ejection_limit_the_streak_grows_but_the_key_stays_in() -> None:
    state = KeyHealth()
    for _ in range(8):
        state = after_failure(state, "server", {}, NOW, POLICY, no_jitter, may_eject=False)
    assert state.failures == 8 and state.usable(NOW) and state.times_ejected == 0
    # Room again: the next failure held against it ejects it.
    state = fail(state, "server", now=NOW + 1)
    assert state.status(NOW + 1) == ("ejected", "server", POLICY.eject_base)


def test_health_success_of_a_call_lent_despite_the_ejection_ends_it() -> None:
    state = KeyHealth()
    for _ in range(POLICY.eject_after):
        state = fail(state, "server")
    served = state.ejected_until
    after = after_success(state, NOW + 2, ejection_served=served)
    assert after.status(NOW + 2) == ("healthy", None, 0.0) and after.usable(NOW + 2)
    assert after.times_ejected == 1  # still remembered, and forgiven with time as before
    # A plain success (the call started before the ejection) does not end it.
    assert not after_success(state, NOW + 2).usable(NOW + 2)
    # Nor does a panic success end a later, longer ejection decided while the call ran.
    longer = replace(state, ejected_until=served + 60)
    assert after_success(longer, NOW + 2, ejection_served=served) == longer


def test_health_success_resets_the_failure_streak() -> None:
    state = fail(fail(KeyHealth(), "server"), "server")
    assert after_success(state, NOW).failures == 0
    clean = KeyHealth()
    assert after_success(clean, NOW) is clean  # nothing to write


def test_health_rejected_request_counts_as_a_working_key() -> None:
    state = fail(KeyHealth(failures=3), "rejected")
    assert state.failures == 0 and state.usable(NOW)


def test_health_merge_keeps_the_later_change_and_the_longer_cooldown() -> None:
    shared = KeyHealth(cool_until=NOW + 100, changed_at=NOW)
    local = KeyHealth(disabled="auth", cool_until=NOW + 5, changed_at=NOW + 1)
    merged = merge(local, shared)
    assert merged.disabled == "auth" and merged.cool_until == NOW + 100


def test_health_json_round_trip_and_unreadable_records() -> None:
    state = fail(fail(KeyHealth(), "server"), "rate_limited", retry_after="3")
    assert KeyHealth.from_json(state.to_json()) == state
    assert KeyHealth.from_json(b"not json") == KeyHealth()
    assert KeyHealth.from_json(None) == KeyHealth()
