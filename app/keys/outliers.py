"""Outlier detection across one upstream's keys, after Envoy's: whether a failure is the key's or
the upstream's, how many keys may be ejected at once, and which keys serve when all are out.

Pure logic: callers pass `now` and the keys' states; nothing here reads a clock or does I/O.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from app.keys.health import KeyHealth

# A key's failures are its own when its failure rate is at least this many times its healthiest
# sibling's (a practical difference)...
CLEARLY_WORSE = 2.0
# ...and exceeds it by this many standard errors (not the luck of a handful of calls). An
# upstream-wide storm gives every key about the same rate, far inside both.
STANDARD_ERRORS = 2.0
# Calls remembered per key: bounds memory whatever the traffic; the window is then shorter.
_CALLS_PER_KEY = 1000

# Why a key is lent although its state says ejected.
Override = Literal["cap", "panic"]


@dataclass(slots=True)
class _Calls:
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)
    failed: int = 0


class OutcomeWindow:
    """This replica's calls with each key over the last `seconds`: what a failure is judged by.

    Kept in memory, not in Redis: every success would otherwise cost a write. Each replica judges
    from its own calls; the ejection it decides is shared.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._calls: dict[tuple[str, str], _Calls] = {}

    def record(self, upstream: str, key_id: str, *, failed: bool, now: float) -> None:
        calls = self._calls.setdefault((upstream, key_id), _Calls())
        if len(calls.outcomes) >= _CALLS_PER_KEY:
            _, dropped = calls.outcomes.popleft()
            calls.failed -= dropped
        calls.outcomes.append((now, failed))
        calls.failed += failed

    def counts(self, upstream: str, key_id: str, now: float) -> tuple[int, int] | None:
        """(failed, made) calls of the key in the window; None when it made none."""
        calls = self._calls.get((upstream, key_id))
        if calls is None:
            return None
        horizon = now - self._seconds
        while calls.outcomes and calls.outcomes[0][0] < horizon:
            _, dropped = calls.outcomes.popleft()
            calls.failed -= dropped
        if not calls.outcomes:
            return None
        return calls.failed, len(calls.outcomes)

    def blames_key(self, upstream: str, key_id: str, siblings: Iterable[str], now: float) -> bool:
        """Whether the key's failures are its own rather than the upstream's: over the window it
        fails clearly more often than its healthiest sibling. With no sibling called in the window
        there is nothing to compare with, and the failure is held against the key."""
        own = self.counts(upstream, key_id, now)
        if own is None:
            return True
        witnesses = [
            found
            for sibling in siblings
            if (found := self.counts(upstream, sibling, now)) is not None
        ]
        if not witnesses:
            return True
        healthiest = min(witnesses, key=lambda found: (found[0] / found[1], -found[1]))
        return clearly_worse(own, healthiest)


def clearly_worse(own: tuple[int, int], sibling: tuple[int, int]) -> bool:
    """Whether (failed, made) calls `own` fail clearly more often than `sibling`'s: at least
    CLEARLY_WORSE times the rate, and by more than STANDARD_ERRORS of the difference between
    two rates measured on that many calls (a two-proportion z-test)."""
    (own_failed, own_made), (sibling_failed, sibling_made) = own, sibling
    own_rate, sibling_rate = own_failed / own_made, sibling_failed / sibling_made
    pooled = (own_failed + sibling_failed) / (own_made + sibling_made)
    spread = math.sqrt(pooled * (1 - pooled) * (1 / own_made + 1 / sibling_made))
    return own_rate >= CLEARLY_WORSE * sibling_rate and own_rate - sibling_rate > (
        STANDARD_ERRORS * spread
    )


def ejection_limit(keys: int, in_service: int, share: float) -> int:
    """How many of an upstream's `keys` may be ejected at once: floor(keys x share), and never
    the last key still in service (not disabled). A share of 1 lifts the limit: any key may be
    ejected, so a failing single-key upstream hands its traffic to the next priority tier."""
    if share >= 1:
        return in_service
    # The epsilon keeps 0.29 x 100 at 29 despite binary floating point.
    return max(0, min(math.floor(keys * share + 1e-9), in_service - 1))


def _ejected(state: KeyHealth, now: float) -> bool:
    return state.disabled is None and state.ejected_until > now


def may_eject(states: Mapping[str, KeyHealth], key_id: str, now: float, share: float) -> bool:
    """Whether ejecting `key_id` keeps the upstream within its ejection limit."""
    in_service = sum(1 for state in states.values() if state.disabled is None)
    others = sum(1 for other, state in states.items() if other != key_id and _ejected(state, now))
    return others < ejection_limit(len(states), in_service, share)


def overrides(
    states: Mapping[str, KeyHealth], now: float, share: float, *, panic: bool
) -> dict[str, Override]:
    """Ejected keys that serve anyway, and why.

    cap: more keys are ejected than the limit allows (replicas that ejected at the same instant,
    or keys disabled since); the ejections ending soonest beyond it are set aside.
    panic (asked for once no upstream of the route has a usable key): when no key is usable but
    some are ejected (the rest cooling after 429s or disabled), the ejected ones serve rather
    than nobody, as Envoy routes to every host below its panic threshold.
    Cooling and disabled keys never do.
    """
    in_service = sum(1 for state in states.values() if state.disabled is None)
    ejected = sorted(
        (key_id for key_id, state in states.items() if _ejected(state, now)),
        key=lambda key_id: states[key_id].ejected_until,
    )
    excess = len(ejected) - ejection_limit(len(states), in_service, share)
    serving: dict[str, Override] = {
        key_id: "cap" for key_id in ejected[: max(0, excess)] if states[key_id].cool_until <= now
    }
    if serving or not panic or any(state.usable(now) for state in states.values()):
        return serving
    return {key_id: "panic" for key_id in ejected if states[key_id].cool_until <= now}


def last_failed_at(state: KeyHealth) -> float:
    """When the key last failed (its last change when no failure is on record)."""
    return state.recent[-1][0] if state.recent else state.changed_at
