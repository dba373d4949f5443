"""Outlier detection across an upstream's keys, as pure functions of the keys' states, the calls
made with them and `now`: the ejection limit, blame, and which ejected keys serve anyway."""

from __future__ import annotations

import random

import pytest

from app.keys.health import KeyHealth
from app.keys.outliers import (
    OutcomeWindow,
    clearly_worse,
    ejection_limit,
    may_eject,
    overrides,
)

NOW = 1_800_000_000.0
HEALTHY = KeyHealth()
EJECTED = KeyHealth(ejected_until=NOW + 30, times_ejected=1, last_failure="server")
COOLING = KeyHealth(cool_until=NOW + 20, last_failure="rate_limited")
DISABLED = KeyHealth(disabled="auth", last_failure="auth")


@pytest.mark.parametrize(
    ("keys", "share", "limit"),
    [
        (1, 0.5, 0),  # a lone key is never ejected: there is nothing to move its traffic to
        (2, 0.5, 1),
        (3, 0.5, 1),  # the default: two of three keys always stay in
        (4, 0.5, 2),
        (5, 0.5, 2),
        (10, 0.1, 1),
        (3, 0.1, 0),  # Envoy's 10% turns ejection off for small pools
        (100, 0.29, 29),  # no floating-point loss
        (3, 0.99, 2),  # never every key...
        (3, 1.0, 3),  # ...unless the operator lifts the limit
        (1, 1.0, 1),
        (3, 0.0, 0),
    ],
)
def test_ejection_limit_is_a_share_of_the_keys_never_all(
    keys: int, share: float, limit: int
) -> None:
    assert ejection_limit(keys, keys, share) == limit


def test_ejection_limit_keeps_one_key_in_service_beside_disabled_ones() -> None:
    assert ejection_limit(4, in_service=2, share=0.5) == 1
    assert ejection_limit(3, in_service=1, share=0.5) == 0


def test_may_eject_counts_the_other_ejected_keys() -> None:
    states = {"a": HEALTHY, "b": HEALTHY, "c": HEALTHY}
    assert may_eject(states, "a", NOW, 0.5)
    states["b"] = EJECTED
    assert not may_eject(states, "a", NOW, 0.5)  # one of three is the limit
    assert may_eject(states, "b", NOW, 0.5)  # extending b's own ejection changes nothing
    assert may_eject(states, "a", NOW + 31, 0.5)  # b is back
    assert not may_eject({"a": HEALTHY, "b": DISABLED}, "a", NOW, 0.5)  # the last key in service


def test_overrides_panic_only_when_asked_for() -> None:
    # The route may have a healthy fallback tier: the forwarder asks for panic routing only
    # once no upstream has a usable key.
    states = {"a": EJECTED, "b": COOLING, "c": COOLING}
    assert overrides(states, NOW, 0.5, panic=False) == {}
    assert overrides(states, NOW, 0.5, panic=True) == {"a": "panic"}
    # The cap is the upstream's own limit: it applies either way.
    lone = {"a": EJECTED, "b": DISABLED}
    assert overrides(lone, NOW, 0.5, panic=False) == {"a": "cap"}


def test_overrides_none_while_a_key_is_usable() -> None:
    assert overrides({"a": EJECTED, "b": HEALTHY, "c": COOLING}, NOW, 0.5, panic=True) == {}


@pytest.mark.parametrize(
    ("others", "found"),
    [
        ((COOLING, COOLING), {"a": "panic"}),
        ((COOLING, DISABLED), {"a": "panic"}),
        # Two of three ejected is over the limit: the cap sets one aside, and it serves.
        ((EJECTED, COOLING), {"a": "cap"}),
    ],
)
def test_overrides_panic_when_no_key_is_usable(
    others: tuple[KeyHealth, KeyHealth], found: dict[str, str]
) -> None:
    assert overrides({"a": EJECTED, "b": others[0], "c": others[1]}, NOW, 0.5, panic=True) == found


def test_overrides_never_lend_a_cooling_or_disabled_key() -> None:
    assert overrides({"a": COOLING, "b": COOLING, "c": DISABLED}, NOW, 0.5, panic=True) == {}
    # Ejected and cooling after a 429: the 429 keeps its meaning.
    both = KeyHealth(ejected_until=NOW + 30, cool_until=NOW + 10)
    assert overrides({"a": both, "b": COOLING}, NOW, 0.5, panic=True) == {}
    assert overrides({"a": both, "b": COOLING}, NOW + 11, 0.5, panic=True) == {"a": "panic"}


def test_overrides_cap_sets_aside_the_ejections_ending_soonest() -> None:
    # Three replicas ejected all three keys at the same moment: two must serve again.
    states = {
        "a": KeyHealth(ejected_until=NOW + 30),
        "b": KeyHealth(ejected_until=NOW + 10),
        "c": KeyHealth(ejected_until=NOW + 20),
    }
    assert overrides(states, NOW, 0.5, panic=True) == {"b": "cap", "c": "cap"}
    assert overrides(states, NOW, 0.0, panic=True) == {"a": "cap", "b": "cap", "c": "cap"}
    # The last key in service beside disabled ones is never out.
    assert overrides({"a": EJECTED, "b": DISABLED, "c": DISABLED}, NOW, 0.5, panic=True) == {
        "a": "cap"
    }


def test_clearly_worse_needs_both_a_real_difference_and_enough_calls() -> None:
    assert clearly_worse((5, 5), (0, 10))  # a dead key beside a healthy one
    assert not clearly_worse((2, 2), (0, 1))  # two calls against one prove nothing yet
    assert not clearly_worse((30, 100), (28, 100))  # a storm: the same rate on every key
    assert not clearly_worse((350, 1000), (300, 1000))  # significant, but not twice as bad
    assert clearly_worse((600, 1000), (50, 1000))
    assert not clearly_worse((10, 10), (10, 10))  # all failing: the upstream is down


def window_with(calls: dict[str, tuple[int, int]], now: float = NOW) -> OutcomeWindow:
    window = OutcomeWindow(30.0)
    for key, (failed, made) in calls.items():
        for n in range(made):
            window.record("up", key, failed=n < failed, now=now - 10 + n * 0.001)
    return window


def test_window_blames_a_key_failing_where_its_siblings_succeed() -> None:
    window = window_with({"a": (6, 6), "b": (0, 6), "c": (1, 6)})
    assert window.blames_key("up", "a", ["b", "c"], NOW)


def test_window_blames_one_of_two_bad_keys_against_the_healthy_third() -> None:
    # Compared with the healthiest sibling, not their average: two dead keys are still outliers.
    window = window_with({"a": (6, 6), "b": (6, 6), "c": (0, 6)})
    assert window.blames_key("up", "a", ["b", "c"], NOW)
    assert window.blames_key("up", "b", ["a", "c"], NOW)


def test_window_blames_no_key_in_a_storm_across_all_of_them() -> None:
    rng = random.Random(3)
    window = OutcomeWindow(30.0)
    blamed = 0
    for n in range(3000):
        key = "abc"[n % 3]
        now = NOW + n * 0.01
        failed = rng.random() < 0.3
        window.record("up", key, failed=failed, now=now)
        if failed and n > 300:  # past the storm's first seconds
            blamed += window.blames_key("up", key, [k for k in "abc" if k != key], now)
    assert blamed == 0


def test_window_without_sibling_calls_blames_the_key() -> None:
    window = window_with({"a": (3, 3)})
    assert window.blames_key("up", "a", ["b", "c"], NOW)
    assert window.blames_key("up", "a", [], NOW)  # a lone key


def test_window_forgets_calls_older_than_its_length() -> None:
    window = window_with({"a": (6, 6), "b": (6, 6), "c": (6, 6)})
    assert not window.blames_key("up", "a", ["b", "c"], NOW)  # all failing: the upstream's
    later = NOW + 30
    for key in "bc":
        for n in range(6):
            window.record("up", key, failed=False, now=later + n * 0.001)
    window.record("up", "a", failed=True, now=later)
    for n in range(5):
        window.record("up", "a", failed=True, now=later + n * 0.001)
    assert window.counts("up", "b", later + 1) == (0, 6)  # the storm's calls are gone
    assert window.blames_key("up", "a", ["b", "c"], later + 1)
    assert window.counts("up", "b", later + 100) is None
