"""One upstream key's health as a pure state machine: what a failure, a success or a probe does.

Times are wall-clock seconds (the state is shared by replicas through Redis, so monotonic clocks
would not compare). Nothing here does I/O or reads a clock: callers pass `now`.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import orjson

from app.errors import FailureKind

KeyStatus = Literal["healthy", "cooling", "ejected", "disabled"]
DisabledReason = Literal["auth", "quota"]

# Failures that may say the key is unwell (rather than the request being wrong): they count
# towards an ejection when the pool blames the key (see app/keys/outliers.py). A failed connection
# is not among them: it happens before any key is sent, so it is always the upstream's. A paid
# task that failed afterwards (`accepted`: BFL's Error, a refused result URL) is among them.
OUTLIER_FAILURES: frozenset[FailureKind] = frozenset(
    {"server", "timeout", "dropped", "bad_response", "accepted"}
)

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    cooldown_initial: float = 1.0
    cooldown_max: float = 60.0
    cooldown_hint_max: float = 3600.0
    # Share of a computed cooldown taken off at random, so keys cooled together do not all
    # return in the same instant.
    jitter: float = 0.2
    eject_after: int = 5
    eject_base: float = 30.0
    eject_max: float = 300.0
    probe_interval: float = 60.0
    recent_errors: int = 5
    # At most floor(keys x share) of an upstream's keys ejected at once, never the last one in
    # service (see app/keys/outliers.py; 1 lifts the limit).
    max_ejected_share: float = 0.5
    # Seconds of this replica's calls over which a key's failure rate is compared with its
    # siblings' before a failure is held against it.
    outlier_window: float = 30.0


@dataclass(frozen=True, slots=True)
class KeySnapshot:
    """One upstream key as the pool sees it at one moment (a metrics scrape, /readyz)."""

    upstream: str
    key_id: str  # the pool's id ("default#1"), never derived from the secret
    state: KeyStatus
    reason: str = "ok"
    cooldown_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class KeyHealth:
    disabled: DisabledReason | None = None
    next_probe_at: float = 0.0
    cool_until: float = 0.0
    cool_streak: int = 0  # consecutive 429s: doubles the cooldown when no hint is given
    failures: int = 0  # consecutive outlier failures
    ejected_until: float = 0.0
    times_ejected: int = 0
    last_failure: FailureKind | None = None
    changed_at: float = 0.0
    recent: tuple[tuple[float, FailureKind], ...] = ()

    def usable(self, now: float) -> bool:
        return self.disabled is None and self.cool_until <= now and self.ejected_until <= now

    def status(self, now: float) -> tuple[KeyStatus, str | None, float]:
        """The state, its reason and the seconds left before it ends by itself (0 if it won't)."""
        if self.disabled is not None:
            return "disabled", self.disabled, 0.0
        if self.cool_until > now:
            return "cooling", "rate_limited", self.cool_until - now
        if self.ejected_until > now:
            return "ejected", self.last_failure, self.ejected_until - now
        return "healthy", None, 0.0

    def recovers_at(self) -> float | None:
        """When a cooling or ejected key is usable again; None for a disabled key."""
        if self.disabled is not None:
            return None
        return max(self.cool_until, self.ejected_until)

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "disabled": self.disabled,
                "next_probe_at": self.next_probe_at,
                "cool_until": self.cool_until,
                "cool_streak": self.cool_streak,
                "failures": self.failures,
                "ejected_until": self.ejected_until,
                "times_ejected": self.times_ejected,
                "last_failure": self.last_failure,
                "changed_at": self.changed_at,
                "recent": self.recent,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str | None) -> KeyHealth:
        if not raw:
            return cls()
        try:
            data: dict[str, Any] = orjson.loads(raw)
            return cls(
                disabled=data.get("disabled"),
                next_probe_at=float(data.get("next_probe_at", 0.0)),
                cool_until=float(data.get("cool_until", 0.0)),
                cool_streak=int(data.get("cool_streak", 0)),
                failures=int(data.get("failures", 0)),
                ejected_until=float(data.get("ejected_until", 0.0)),
                times_ejected=int(data.get("times_ejected", 0)),
                last_failure=data.get("last_failure"),
                changed_at=float(data.get("changed_at", 0.0)),
                recent=tuple((float(at), kind) for at, kind in data.get("recent", ())),
            )
        except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
            # A record we cannot read (another version wrote it) must not take the key away.
            return cls()


def after_failure(
    state: KeyHealth,
    kind: FailureKind,
    headers: Mapping[str, str],
    now: float,
    policy: HealthPolicy,
    rng: Callable[[], float],
    *,
    blamed: bool = True,
    may_eject: bool = True,
) -> KeyHealth:
    """The key's state after a failed call.

    `blamed`: the pool judged an outlier failure the key's own, not the upstream's; only those
    build the streak that ejects. `may_eject`: the upstream is below its ejection limit; above
    it the streak keeps growing and the key stays in.
    """
    if kind == "rejected":
        # The upstream judged the request, which proves the key works.
        return after_success(state, now)
    recent = (*state.recent, (now, kind))[-policy.recent_errors :]
    noted = replace(state, last_failure=kind, changed_at=now, recent=recent)
    if kind == "rate_limited":
        streak = state.cool_streak + 1
        wait = cooldown_hint(headers, now)
        if wait is None:
            wait = min(policy.cooldown_initial * 2 ** min(streak - 1, 30), policy.cooldown_max)
            wait *= 1.0 - policy.jitter * rng()
        wait = min(wait, policy.cooldown_hint_max)
        # A repeated 429 extends a cooldown, never shortens it.
        return replace(
            noted, cool_until=max(state.cool_until, now + wait), cool_streak=streak, failures=0
        )
    if kind in ("auth", "quota"):
        return replace(noted, disabled=kind, next_probe_at=now + policy.probe_interval, failures=0)
    if kind in OUTLIER_FAILURES and blamed:
        failures = state.failures + 1
        if failures < policy.eject_after or not may_eject:
            return replace(noted, failures=failures)
        times = _forgiven(state, now, policy) + 1
        until = now + min(policy.eject_base * times, policy.eject_max)
        return replace(
            noted,
            failures=0,
            times_ejected=times,
            ejected_until=max(state.ejected_until, until),
        )
    return noted


def _forgiven(state: KeyHealth, now: float, policy: HealthPolicy) -> int:
    """Past ejections still held against a key: one is forgiven for every `eject_max` seconds
    it has spent back in service since its last ejection ended, so a key that misbehaved once
    last week is not ejected for the maximum at its next bad minute."""
    if state.times_ejected == 0 or now <= state.ejected_until:
        return state.times_ejected
    forgiven = int((now - state.ejected_until) // policy.eject_max)
    return max(0, state.times_ejected - forgiven)


def after_success(state: KeyHealth, now: float, *, ejection_served: float = 0.0) -> KeyHealth:
    """The key's state after a successful call.

    `ejection_served`: the call was lent while the key was ejected until then (panic routing or
    the ejection cap); its success proves the key works, so that ejection ends now. A later
    ejection, decided while the call ran, stays.
    """
    ends_ejection = ejection_served > now and state.ejected_until == ejection_served
    if state.failures == 0 and state.cool_streak == 0 and not ends_ejection:
        return state
    # A cooldown already set stays: this success may have started before the 429.
    return replace(
        state,
        failures=0,
        cool_streak=0,
        changed_at=now,
        ejected_until=now if ends_ejection else state.ejected_until,
    )


def claim_probe(state: KeyHealth, now: float, policy: HealthPolicy) -> KeyHealth:
    """Book the next probe of a disabled key that is due; the state is unchanged otherwise.

    Booking before probing means only one replica probes a key per interval.
    """
    if state.disabled is None or state.next_probe_at > now:
        return state
    return replace(state, next_probe_at=now + policy.probe_interval)


def after_probe(state: KeyHealth, passed: bool, now: float) -> KeyHealth:
    if not passed or state.disabled is None:
        return state
    return replace(
        state, disabled=None, next_probe_at=0.0, failures=0, cool_streak=0, changed_at=now
    )


def merge(local: KeyHealth, shared: KeyHealth) -> KeyHealth:
    """Combine what a replica learnt while Redis was away with what Redis holds.

    The later change wins; cooldowns and ejections keep the later end, so a resync never
    shortens one.
    """
    newer, older = (local, shared) if local.changed_at > shared.changed_at else (shared, local)
    return replace(
        newer,
        cool_until=max(newer.cool_until, older.cool_until),
        ejected_until=max(newer.ejected_until, older.ejected_until),
        times_ejected=max(newer.times_ejected, older.times_ejected),
    )


def cooldown_hint(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds to wait, from retry-after-ms, retry-after or x-ratelimit-reset-requests."""
    value = headers.get("retry-after-ms")
    if value is not None:
        seconds = _number(value)
        if seconds is not None:
            return seconds / 1000.0
    value = headers.get("retry-after")
    if value is not None:
        seconds = _number(value)
        if seconds is None:
            seconds = _http_date_delay(value, now)
        if seconds is not None:
            return seconds
    value = headers.get("x-ratelimit-reset-requests")
    if value is not None:
        return parse_duration(value)
    return None


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations: "1s", "6m0s", "20ms", "1h2m3.5s"; a bare number is seconds."""
    text = text.strip()
    plain = _number(text)
    if plain is not None:
        return plain
    total, position = 0.0, 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        amount, unit = float(match.group(1)), match.group(2)
        total += amount * {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
        position = match.end()
    return total if position == len(text) and position > 0 else None


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if value >= 0 and value == value and value != float("inf") else None


def _http_date_delay(text: str, now: float) -> float | None:
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)
