"""Routing and retries: which upstream and key serve each attempt, and whether to try again.

Routing: a model's `upstreams` list is an ordered fallback. Upstreams are grouped by their
priority (lowest number first) and, within a tier, tried in the order the model lists them: the
first with a usable key serves, the next ones only when it has none left (unhealthy, or already
tried by this request). Traffic is split only where config asks for it: a tier in which an
upstream sets `weight` is drawn by weight instead (an upstream without one counts as 1).

Retry policy, decided here and nowhere else (a key's own health is the pool's business):
  failure         another attempt?                         why
  rate_limited    yes, on another key                      that key cools; the others may not
  auth, quota     yes, on another key                      that key is disabled; the request is fine
  connect         yes, on another key                      never delivered, so never run or billed
  server,         at most retry.server_error_retries       may be transient; default once
  bad_response      times, on another key
  timeout,        only if the model sets                   the edit may be running, and billed
  dropped           resend_after_timeout                   (OUTCOME_UNKNOWN, app/errors.py)
  rejected        never                                    the upstream's 4xx goes back as it is
  accepted        never                                    the upstream accepted a task it bills
                                                           on submit (BFL): paid for (PAID)
Every request is bounded by retry.max_attempts, and retry.deadline covers all of its attempts.
When no key is left to try: 429 with retry-after if what is left is only cooling; else the last
attempt's error if this request made one; else (nothing usable at all) 503. An ejected key never
causes that 503: when nothing else is usable the pool lends it anyway (panic routing).
An error after a failover, or after an attempt that may have been billed, carries
`x-should-retry: false`, so the SDK does not multiply upstream attempts.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import groupby

from app.config.settings import RetryConfig
from app.errors import (
    OUTCOME_UNKNOWN,
    PAID,
    FailureKind,
    GatewayError,
    NoUsableKey,
    RateLimited,
    UpstreamTimeout,
)
from app.intake.request import EditRequest
from app.keys.pool import KeyPool, Lease, Shortage
from app.observability.metrics import GatewayMetrics
from app.upstream.base import PartialSink, Upstream, UpstreamAnswer

_ANOTHER_KEY: frozenset[FailureKind] = frozenset({"rate_limited", "auth", "quota", "connect"})
_SERVER: frozenset[FailureKind] = frozenset({"server", "bad_response"})


# Told of each attempt as it starts: the upstream's name and the key's id (None: keyless).
AttemptNote = Callable[[str, str | None], None]


@dataclass(frozen=True, slots=True)
class Route:
    priority: int = 0
    # None: no split asked for; the model's list order decides within the priority tier.
    weight: int | None = None


class Forwarder:
    def __init__(
        self,
        upstreams: Mapping[str, Upstream],
        pool: KeyPool,
        *,
        metrics: GatewayMetrics,
        routes: Mapping[str, Route] | None = None,
        retry: RetryConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._upstreams = upstreams
        self._pool = pool
        self._routes = routes or {}
        self._retry = retry or RetryConfig()
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng
        self._metrics = metrics

    @property
    def pool(self) -> KeyPool:
        return self._pool

    async def edit(
        self,
        edit: EditRequest,
        *,
        on_partial: PartialSink | None = None,
        on_attempt: AttemptNote | None = None,
    ) -> tuple[UpstreamAnswer, str]:
        """The upstream's answer and the name of the upstream that gave it. Each attempt is
        noted with `on_attempt` (its upstream and key id) as it starts, and hands its partial
        images (if its upstream streams them) to `on_partial`."""
        deadline = self._clock() + self._retry.deadline
        tried: dict[str, set[str]] = {}
        attempts = 0
        server_retries = 0
        last_error: GatewayError | None = None
        previous: tuple[str, FailureKind] | None = None  # the last failed attempt's upstream
        while attempts < self._retry.max_attempts:
            remaining = deadline - self._clock()
            if remaining <= 0:
                break
            found = await self._lease(edit, tried)
            if isinstance(found, Shortage):
                raise self._no_key_left(edit, found, last_error, attempts)
            lease = found
            if previous is not None:
                self._metrics.record_retry(previous[0], previous[1])
                if previous[0] != lease.upstream:
                    self._metrics.record_failover(previous[0], lease.upstream)
            if lease.override is not None:
                self._metrics.record_ejection_override(lease.upstream, lease.override)
            attempts += 1
            if lease.key is not None:
                tried.setdefault(lease.upstream, set()).add(lease.key.id)
            try:
                answer = await self._attempt(edit, lease, remaining, on_partial, on_attempt)
            except GatewayError as error:
                if error.failure is None:
                    raise
                await self._pool.report_failure(lease, error.failure, error.upstream_headers)
                last_error = error
                previous = (lease.upstream, error.failure)
                if not self._may_retry(edit, error.failure, server_retries):
                    raise self._final(edit, error, attempts) from None
                if error.failure in _SERVER:
                    server_retries += 1
                continue
            finally:
                lease.release()
            await self._pool.report_success(lease)
            return answer, lease.upstream
        if last_error is None:
            last_error = _deadline_error(self._retry.deadline)
        raise self._final(edit, last_error, attempts)

    async def _attempt(
        self,
        edit: EditRequest,
        lease: Lease,
        remaining: float,
        on_partial: PartialSink | None,
        on_attempt: AttemptNote | None,
    ) -> UpstreamAnswer:
        """One call to one upstream with one key, timed and counted whatever its outcome."""
        upstream = self._upstreams[lease.upstream]
        if on_attempt is not None:
            on_attempt(upstream.name, lease.key.id if lease.key else None)
        start = time.perf_counter()
        outcome = "ok"
        try:
            async with asyncio.timeout(remaining):
                return await upstream.edit(edit, lease.key, on_partial=on_partial)
        except TimeoutError:
            outcome = "timeout"
            raise _deadline_error(self._retry.deadline) from None
        except GatewayError as exc:
            outcome = exc.failure or "bad_response"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client left or shutdown ran out of time, not the upstream
            raise
        finally:
            self._metrics.record_upstream(
                upstream.name, edit.model.name, outcome, time.perf_counter() - start
            )

    def _may_retry(self, edit: EditRequest, failure: FailureKind, server_retries: int) -> bool:
        if failure in PAID:
            return False
        if failure in _ANOTHER_KEY:
            return True
        if failure in _SERVER:
            return server_retries < self._retry.server_error_retries
        if failure in OUTCOME_UNKNOWN:
            return edit.model.resend_after_timeout
        return False

    def _final(self, edit: EditRequest, error: GatewayError, attempts: int) -> GatewayError:
        unknown = error.failure in OUTCOME_UNKNOWN and not edit.model.resend_after_timeout
        if attempts >= 2 or unknown or error.failure in PAID:
            return error.with_headers({"x-should-retry": "false"})
        return error

    async def _lease(self, edit: EditRequest, tried: Mapping[str, set[str]]) -> Lease | Shortage:
        known = [name for name in edit.model.upstreams if name in self._upstreams]
        # A stable sort: within a priority tier the model's list order stands.
        by_priority = sorted(known, key=lambda name: self._route(name).priority)
        tiers = [
            self._tier_order(list(tier))
            for _, tier in groupby(by_priority, key=lambda name: self._route(name).priority)
        ]
        # Every tier's usable keys first; only when there are none anywhere do ejected keys
        # serve (panic routing), rather than a 503 while keys exist.
        shortage = Shortage()
        for panic in (False, True):
            shortage = Shortage()
            for tier in tiers:
                for name in tier:
                    found = await self._pool.acquire(name, tried.get(name, ()), panic=panic)
                    if isinstance(found, Lease):
                        return found
                    shortage.add(found)
            if shortage.recovers_at is None:
                break  # nothing is ejected: panic routing would find what this pass found
        return shortage

    def _route(self, upstream: str) -> Route:
        return self._routes.get(upstream, Route())

    def _tier_order(self, names: list[str]) -> list[str]:
        """The order one priority tier is tried in: the model's list order (a fallback), unless
        an upstream in it sets a weight (a split)."""
        weights = [self._route(name).weight for name in names]
        if len(names) < 2 or all(weight is None for weight in weights):
            return names
        # Weighted sampling without replacement (Efraimidis-Spirakis): the first upstream is
        # drawn by weight, the next ones follow in case it has no key to lend.
        drawn = {
            name: self._rng() ** (1.0 / (weight or 1))
            for name, weight in zip(names, weights, strict=True)
        }
        return sorted(names, key=lambda name: -drawn[name])

    def _no_key_left(
        self,
        edit: EditRequest,
        shortage: Shortage,
        last_error: GatewayError | None,
        attempts: int,
    ) -> GatewayError:
        now = self._wall_clock()
        model = edit.model.name
        error: GatewayError
        if shortage.rate_limited_until is not None and not shortage.tried and not shortage.busy:
            wait = max(shortage.rate_limited_until - now, 0.001)
            error = RateLimited(
                f"Every upstream key serving {model} is rate limited; retry in "
                f"{math.ceil(wait)} s.",
                headers={
                    "retry-after": str(math.ceil(wait)),
                    "retry-after-ms": str(math.ceil(wait * 1000)),
                },
            )
        elif shortage.busy:
            error = NoUsableKey(
                f"Every upstream key serving {model} is at its concurrency limit.",
                headers={"retry-after": "1"},
            )
        elif last_error is not None:
            # This request's own attempts used the keys up: what happened says more than a 503.
            error = last_error
        else:
            headers = {}
            if shortage.recovers_at is not None:
                headers["retry-after"] = str(math.ceil(max(shortage.recovers_at - now, 1.0)))
            error = NoUsableKey(
                f"No upstream key is usable for {model} right now; operators have been told.",
                headers=headers,
            )
        return self._final(edit, error, attempts)


def _deadline_error(deadline: float) -> GatewayError:
    return UpstreamTimeout(
        f"The upstream did not answer within the {deadline:g} s deadline.", failure="timeout"
    )
