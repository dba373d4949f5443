"""The key pool: which key of an upstream serves the next attempt, and what each outcome does to it.

Selection: among usable keys (not disabled, cooling or ejected) below their caps, the one with the
fewest requests in flight, then the one used least recently. A key at a cap is skipped, never
queued behind. Ejection never empties an upstream (app/keys/outliers.py): ejections beyond
`max_ejected_share` are set aside, and when asked for panic routing (the route has no usable key
anywhere) the ejected keys serve, the one with fewest requests in flight then the one that failed
longest ago first. In-flight counts and the outcome window are this replica's; health and rpm
counters live in the store.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from app.config.settings import KeySpec
from app.errors import FailureKind
from app.keys.health import (
    OUTLIER_FAILURES,
    HealthPolicy,
    KeyHealth,
    KeySnapshot,
    after_failure,
    after_probe,
    after_success,
    claim_probe,
)
from app.keys.outliers import (
    OutcomeWindow,
    Override,
    last_failed_at,
    may_eject,
    overrides,
)
from app.keys.store import RPM_WINDOW_SECONDS, StateStore, minute_of
from app.upstream.base import UpstreamKey


@dataclass(frozen=True, slots=True)
class PoolUpstream:
    name: str
    keys: tuple[KeySpec, ...]
    max_concurrency: int | None = None


@dataclass(slots=True)
class Lease:
    """One attempt's hold on a key (None for an upstream that needs none); release it once."""

    upstream: str
    key: UpstreamKey | None
    seen: KeyHealth
    _pool: KeyPool
    # Why the key was lent although ejected (its success then ends the ejection); None if not.
    override: Override | None = None
    _released: bool = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self)


@dataclass(slots=True)
class Shortage:
    """Why no key could be lent: what the client should be told."""

    # Earliest end of a 429 cooldown or of an rpm window among the keys held back by one.
    rate_limited_until: float | None = None
    # Earliest end of an ejection.
    recovers_at: float | None = None
    busy: bool = False  # a key or the upstream is at its concurrency cap
    disabled: int = 0
    tried: int = 0  # usable keys this request has already tried

    def add(self, other: Shortage) -> None:
        self.rate_limited_until = _earliest(self.rate_limited_until, other.rate_limited_until)
        self.recovers_at = _earliest(self.recovers_at, other.recovers_at)
        self.busy = self.busy or other.busy
        self.disabled += other.disabled
        self.tried += other.tried


def _earliest(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@dataclass(slots=True)
class _Counters:
    in_flight: dict[tuple[str, str], int] = field(default_factory=dict)
    upstream_in_flight: dict[str, int] = field(default_factory=dict)
    last_used: dict[tuple[str, str], int] = field(default_factory=dict)
    sequence: int = 0


class KeyPool:
    def __init__(
        self,
        upstreams: Iterable[PoolUpstream],
        store: StateStore,
        *,
        policy: HealthPolicy | None = None,
        clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._upstreams = {upstream.name: upstream for upstream in upstreams}
        self._store = store
        self._policy = policy or HealthPolicy()
        self._clock = clock
        self._rng = rng
        self._counters = _Counters()
        self._outcomes = OutcomeWindow(self._policy.outlier_window)
        # Each key's state as this replica last read or wrote it: a success clears a failure
        # streak that concurrent calls built after its lease was taken.
        self._latest: dict[tuple[str, str], KeyHealth] = {}
        self._deciding = {name: asyncio.Lock() for name in self._upstreams}

    @property
    def store(self) -> StateStore:
        return self._store

    def upstream_names(self) -> list[str]:
        return list(self._upstreams)

    def in_flight(self, upstream: str, key_id: str | None = None) -> int:
        if key_id is None:
            return self._counters.upstream_in_flight.get(upstream, 0)
        return self._counters.in_flight.get((upstream, key_id), 0)

    async def acquire(
        self, upstream: str, exclude: Collection[str] = (), *, panic: bool = False
    ) -> Lease | Shortage:
        """A lease on the best key of `upstream` not in `exclude`, or why there is none.

        `panic`: lend an ejected key when no key is usable; the caller asks only once every
        upstream it could use has none, so a healthy fallback tier is preferred.
        """
        config = self._upstreams[upstream]
        counters = self._counters
        cap = config.max_concurrency
        if cap is not None and counters.upstream_in_flight.get(upstream, 0) >= cap:
            return Shortage(busy=True)
        if not config.keys:
            return self._lend(upstream, None, KeyHealth())
        now = self._clock()
        states = await self._load(upstream)
        overridden = overrides(states, now, self._policy.max_ejected_share, panic=panic)
        shortage = Shortage()
        candidates: list[KeySpec] = []
        for spec in config.keys:
            state = states[spec.id]
            if not state.usable(now) and spec.id not in overridden:
                if state.disabled is not None:
                    shortage.disabled += 1
                elif state.cool_until > now:
                    shortage.rate_limited_until = _earliest(
                        shortage.rate_limited_until, state.recovers_at()
                    )
                else:
                    shortage.recovers_at = _earliest(shortage.recovers_at, state.ejected_until)
            elif spec.id in exclude:
                shortage.tried += 1
            elif (
                spec.max_concurrency is not None
                and counters.in_flight.get((upstream, spec.id), 0) >= spec.max_concurrency
            ):
                shortage.busy = True
            else:
                candidates.append(spec)
        candidates.sort(
            key=lambda spec: (
                counters.in_flight.get((upstream, spec.id), 0),
                # An ejected key lent anyway ranks after healthy ones at equal load; among
                # ejected ones (panic routing) the one that failed longest ago goes first.
                last_failed_at(states[spec.id]) if spec.id in overridden else 0.0,
                counters.last_used.get((upstream, spec.id), 0),
            )
        )
        for spec in candidates:
            lease = self._lend(upstream, spec, states[spec.id], overridden.get(spec.id))
            if spec.rpm is None or await self._store.take_rpm(upstream, spec.id, spec.rpm, now):
                return lease
            # Held from before the await, so no other request took the key meanwhile.
            lease.release()
            next_window = (minute_of(now) + 1) * RPM_WINDOW_SECONDS
            shortage.rate_limited_until = _earliest(shortage.rate_limited_until, next_window)
        return shortage

    async def _load(self, upstream: str) -> dict[str, KeyHealth]:
        """Every key of `upstream` by id, remembered as this replica's latest view."""
        ids = [spec.id for spec in self._upstreams[upstream].keys]
        found = await self._store.load(upstream, ids)
        states = {key_id: found.get(key_id, KeyHealth()) for key_id in ids}
        for key_id, state in states.items():
            self._latest[(upstream, key_id)] = state
        return states

    def _lend(
        self,
        upstream: str,
        spec: KeySpec | None,
        seen: KeyHealth,
        override: Override | None = None,
    ) -> Lease:
        counters = self._counters
        counters.upstream_in_flight[upstream] = counters.upstream_in_flight.get(upstream, 0) + 1
        key = None
        if spec is not None:
            slot = (upstream, spec.id)
            counters.in_flight[slot] = counters.in_flight.get(slot, 0) + 1
            counters.sequence += 1
            counters.last_used[slot] = counters.sequence
            key = UpstreamKey(id=spec.id, secret=spec.secret)
        return Lease(upstream=upstream, key=key, seen=seen, _pool=self, override=override)

    def _release(self, lease: Lease) -> None:
        counters = self._counters
        counters.upstream_in_flight[lease.upstream] -= 1
        if lease.key is not None:
            counters.in_flight[(lease.upstream, lease.key.id)] -= 1

    async def report_failure(
        self, lease: Lease, kind: FailureKind, headers: Mapping[str, str]
    ) -> KeyHealth | None:
        if lease.key is None:
            return None
        upstream, key_id = lease.upstream, lease.key.id
        now = self._clock()
        if kind == "rejected":
            # The upstream judged the request: the key works.
            self._outcomes.record(upstream, key_id, failed=False, now=now)
        if kind not in OUTLIER_FAILURES:
            return await self._note_failure(upstream, key_id, kind, headers, now)
        self._outcomes.record(upstream, key_id, failed=True, now=now)
        siblings = [
            spec.id
            for spec in self._upstreams[upstream].keys
            if spec.id != key_id
            and self._latest.get((upstream, spec.id), KeyHealth()).disabled is None
        ]
        if not self._outcomes.blames_key(upstream, key_id, siblings, now):
            # The siblings fail as often: the upstream's failure, noted but not held against it.
            return await self._note_failure(upstream, key_id, kind, headers, now, blamed=False)
        # One ejection decision at a time per upstream in this replica, on fresh states, so the
        # limit also counts what other replicas decided meanwhile. Replicas deciding at the same
        # instant can still overshoot it; selection sets the excess aside (outliers.overrides).
        async with self._deciding[upstream]:
            states = await self._load(upstream)
            allowed = may_eject(states, key_id, now, self._policy.max_ejected_share)
            return await self._note_failure(upstream, key_id, kind, headers, now, ejectable=allowed)

    async def _note_failure(
        self,
        upstream: str,
        key_id: str,
        kind: FailureKind,
        headers: Mapping[str, str],
        now: float,
        *,
        blamed: bool = True,
        ejectable: bool = True,
    ) -> KeyHealth:
        def change(state: KeyHealth) -> KeyHealth:
            return after_failure(
                state,
                kind,
                headers,
                now,
                self._policy,
                self._rng,
                blamed=blamed,
                may_eject=ejectable,
            )

        _, after = await self._store.update(upstream, key_id, change)
        self._latest[(upstream, key_id)] = after
        return after

    async def report_success(self, lease: Lease) -> None:
        if lease.key is None:
            return
        upstream, key_id = lease.upstream, lease.key.id
        now = self._clock()
        self._outcomes.record(upstream, key_id, failed=False, now=now)
        served = lease.seen.ejected_until if lease.override is not None else 0.0
        latest = self._latest.get((upstream, key_id), lease.seen)
        if after_success(latest, now, ejection_served=served) is latest:
            # Nothing to clear (the common case): no write, no round trip.
            return
        _, after = await self._store.update(
            upstream, key_id, lambda state: after_success(state, now, ejection_served=served)
        )
        self._latest[(upstream, key_id)] = after

    async def claim_probes(self, upstream: str) -> list[UpstreamKey]:
        """Disabled keys of `upstream` due for a probe, each booked so one replica probes it."""
        now = self._clock()
        keys = self._upstreams[upstream].keys
        states = await self._store.load(upstream, [spec.id for spec in keys])
        claimed = []
        for spec in keys:
            state = states.get(spec.id, KeyHealth())
            if state.disabled is None or state.next_probe_at > now:
                continue
            before, after = await self._store.update(
                upstream, spec.id, lambda state: claim_probe(state, now, self._policy)
            )
            if after != before:
                claimed.append(UpstreamKey(id=spec.id, secret=spec.secret))
        return claimed

    async def report_probe(self, upstream: str, key_id: str, passed: bool) -> KeyHealth:
        now = self._clock()
        _, after = await self._store.update(
            upstream, key_id, lambda state: after_probe(state, passed, now)
        )
        return after

    async def snapshots(self) -> list[KeySnapshot]:
        """Every configured key's state, for the metrics scrape."""
        now = self._clock()
        found: list[KeySnapshot] = []
        for upstream, config in self._upstreams.items():
            states = await self._store.load(upstream, [spec.id for spec in config.keys])
            for spec in config.keys:
                status, reason, left = states.get(spec.id, KeyHealth()).status(now)
                found.append(KeySnapshot(upstream, spec.id, status, reason or "ok", left))
        return found

    async def snapshot(self) -> list[dict[str, Any]]:
        """Every configured key, by id, with its health: the admin view. Never a secret."""
        now = self._clock()
        views: list[dict[str, Any]] = []
        for upstream, config in self._upstreams.items():
            states = await self._store.load(upstream, [spec.id for spec in config.keys])
            for spec in config.keys:
                state = states.get(spec.id, KeyHealth())
                status, reason, left = state.status(now)
                views.append(
                    {
                        "id": spec.id,
                        "upstream": upstream,
                        "state": status,
                        "reason": reason,
                        "cooldown_left": round(left, 3),
                        "in_flight": self.in_flight(upstream, spec.id),
                        "consecutive_failures": state.failures,
                        "times_ejected": state.times_ejected,
                        "next_probe_in": (
                            round(max(0.0, state.next_probe_at - now), 3)
                            if state.disabled is not None
                            else None
                        ),
                        "max_concurrency": spec.max_concurrency,
                        "rpm": spec.rpm,
                        "recent_errors": [
                            {"at": round(at, 3), "kind": kind} for at, kind in state.recent
                        ],
                    }
                )
        return views
