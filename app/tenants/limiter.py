"""Per-client limits enforced in Redis, so they hold however many replicas serve the client.

Two checks per edit, each one Lua script (atomic; it either admits and counts, or refuses and
counts nothing):
  * on arrival, before the upload is read: requests per minute and concurrent requests;
  * after validation, once `n` and the model are known: images per minute and the daily and
    monthly image quotas (UTC days and months).
Per-minute limits are exact sliding windows (a log of the last minute's admissions, timed by the
Redis server's clock so replicas with skewed clocks agree). Concurrency is a set of leases that a
task renews while the request runs; a crashed replica's leases lapse after `lease_seconds`.

Redis layout, one hash tag per client so every script stays on one Redis Cluster slot and touches
only the keys it declares:
  <ns>:{client:<name>}:rpm                  zset  request id -> admission time (ms)
  <ns>:{client:<name>}:ipm                  zset  "<request id>:<n>" -> admission time (ms)
  <ns>:{client:<name>}:inflight             zset  request id -> lease expiry (ms)
  <ns>:{client:<name>}:images:day:<YYYYMMDD>  int  images charged that UTC day
  <ns>:{client:<name>}:images:month:<YYYYMM>  int  images charged that UTC month

When Redis is unreachable every limit fails open: an outage of the shared store must not stop
every team's work. The failure is logged and counted, and quota charges made meanwhile are kept
here and added to Redis once it answers again, so quotas catch up with what was really used.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from app.errors import InvalidRequest, QuotaExceeded, RateLimited, StoreUnavailable
from app.shared_state.failures import store_errors
from app.tenants.directory import ClientPolicy
from app.tenants.held import HeldIncrements

log = logging.getLogger("gateway.clients")

WINDOW_MS = 60_000
LEASE_SECONDS = 60.0
# Quota counters outlive their period a little, for ops to look at yesterday's count.
DAY_TTL_SECONDS = 3 * 86400
MONTH_TTL_SECONDS = 35 * 86400
# A concurrency refusal cannot know when a slot frees; this is a polite guess.
CONCURRENCY_RETRY_MS = 1000
UNLIMITED = -1

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: rpm, inflight. ARGV: request id, rpm limit, concurrency limit, lease ms, window ms.
# Returns {0, requests left this window, ms until the oldest leaves it} when admitted (-1 left:
# no rpm limit), else {1 (rpm) | 2 (concurrency), retry after ms}.
_ADMIT_REQUEST = (
    _NOW_MS
    + """
local rpm, conc = tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, window = tonumber(ARGV[4]), tonumber(ARGV[5])
if rpm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    local wait = window
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    if oldest[2] then wait = tonumber(oldest[2]) + window - now end
    return {1, wait}
  end
end
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then return {2, 0} end
end
if rpm >= 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], window)
end
if conc >= 0 then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[1])
  redis.call('PEXPIRE', KEYS[2], lease)
end
if rpm < 0 then return {0, -1, 0} end
local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, rpm - redis.call('ZCARD', KEYS[1]), tonumber(oldest[2]) + window - now}
"""
)

# KEYS: inflight. ARGV: request id, lease ms. Renews a lease if it is still held.
_RENEW = (
    _NOW_MS
    + """
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[2]), ARGV[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
end
return 1
"""
)

# KEYS: ipm, day, month. ARGV: request id, n, ipm limit, day limit, month limit, day ttl s,
# month ttl s, window ms. Returns {0, 0} when admitted, else {1 (ipm), retry after ms},
# {3 (day), used} or {4 (month), used}.
_ADMIT_IMAGES = (
    _NOW_MS
    + """
local n = tonumber(ARGV[2])
local ipm, day, month = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local window = tonumber(ARGV[8])
if day >= 0 then
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + n > day then return {3, used} end
end
if month >= 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
  if used + n > month then return {4, used} end
end
if ipm >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  local entries = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
  local used = 0
  for i = 1, #entries, 2 do used = used + tonumber(string.match(entries[i], ':(%d+)$')) end
  if used + n > ipm then
    -- the oldest admissions leave the window first; wait until enough have left
    local wait = window
    for i = 1, #entries, 2 do
      used = used - tonumber(string.match(entries[i], ':(%d+)$'))
      if used + n <= ipm then
        wait = tonumber(entries[i + 1]) + window - now
        break
      end
    end
    return {1, wait}
  end
  redis.call('ZADD', KEYS[1], now, ARGV[1] .. ':' .. ARGV[2])
  redis.call('PEXPIRE', KEYS[1], window)
end
if day >= 0 or month >= 0 then
  redis.call('INCRBY', KEYS[2], n)
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
  redis.call('INCRBY', KEYS[3], n)
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[7]))
end
return {0, 0}
"""
)

# KEYS: ipm, day, month. ARGV: request id, n charged, images to give back, images kept.
# The per-minute entry keeps its time and shrinks to what was kept (or goes, if nothing was).
_REFUND = """
local back = tonumber(ARGV[3])
if back > 0 then
  for i = 2, 3 do
    if redis.call('EXISTS', KEYS[i]) == 1 then
      if redis.call('DECRBY', KEYS[i], back) < 0 then redis.call('SET', KEYS[i], 0, 'KEEPTTL') end
    end
  end
end
local member = ARGV[1] .. ':' .. ARGV[2]
local admitted = redis.call('ZSCORE', KEYS[1], member)
if admitted then
  redis.call('ZREM', KEYS[1], member)
  if tonumber(ARGV[4]) > 0 then redis.call('ZADD', KEYS[1], admitted, ARGV[1] .. ':' .. ARGV[4]) end
end
return 1
"""


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value


@dataclass(frozen=True, slots=True)
class QuotaPeriod:
    """The UTC day and month an image is charged to, and when each ends."""

    day: str
    month: str
    seconds_to_next_day: float
    seconds_to_next_month: float

    @classmethod
    def at(cls, now: float) -> QuotaPeriod:
        moment = datetime.fromtimestamp(now, UTC)
        start_of_day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        next_day = start_of_day + timedelta(days=1)
        next_month = (start_of_day.replace(day=28) + timedelta(days=4)).replace(day=1)
        return cls(
            day=moment.strftime("%Y%m%d"),
            month=moment.strftime("%Y%m"),
            seconds_to_next_day=(next_day - moment).total_seconds(),
            seconds_to_next_month=(next_month - moment).total_seconds(),
        )


class Slot:
    """One admitted request: releases its concurrency lease and settles its image charge."""

    def __init__(self, limiter: Limiter, policy: ClientPolicy, request_id: str) -> None:
        self._limiter = limiter
        self.policy = policy
        self.request_id = request_id
        self.leased = False
        self._renewal: asyncio.Task[None] | None = None
        self._charged = 0
        self._period: QuotaPeriod | None = None
        # Rate-limit headers for the response (requests per minute), when the client has one.
        self.headers: dict[str, str] = {}

    async def take_images(self, n: int) -> None:
        """Charge `n` images to the per-minute limit and the quotas, or raise 429."""
        limits = self.policy.limits
        if limits.images_per_minute is not None and n > limits.images_per_minute:
            raise InvalidRequest(
                f"n={n} is more than this client's limit of {limits.images_per_minute} images "
                "per minute; ask for fewer images per request.",
                param="n",
                code="n_above_client_limit",
            )
        self._period = QuotaPeriod.at(self._limiter.clock())
        if await self._limiter._admit_images(self, n, self._period):
            self._charged = n

    async def settle(self, delivered: int | None) -> None:
        """Keep the charge for images delivered (None: unknown, maybe billed upstream: keep
        it all); give back the rest."""
        if self._charged == 0 or self._period is None:
            return
        kept = self._charged if delivered is None else min(delivered, self._charged)
        if kept < self._charged:
            await self._limiter._refund(self, kept)
        self._charged = kept

    @property
    def charged_images(self) -> int:
        return self._charged

    def _start_renewal(self) -> None:
        self._renewal = asyncio.create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self._limiter.lease_seconds / 3)
            await self._limiter._renew(self)

    async def release(self) -> None:
        if self._renewal is not None:
            self._renewal.cancel()
            self._renewal = None
        if self.leased:
            self.leased = False
            await self._limiter._release(self)


class Limiter:
    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        namespace: str,
        clock: Callable[[], float] = time.time,
        lease_seconds: float = LEASE_SECONDS,
        on_store_error: Callable[[str], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._namespace = namespace
        self.clock = clock
        self.lease_seconds = lease_seconds
        self._on_store_error = on_store_error
        self._on_refused = on_refused
        # Quota charges made while Redis was unreachable.
        self._held = HeldIncrements()

    def _key(self, client: str, suffix: str) -> str:
        return f"{self._namespace}:{{client:{client}}}:{suffix}"

    async def admit(self, policy: ClientPolicy, request_id: str) -> Slot:
        """Count one request against requests/min and take a concurrency slot, or raise 429."""
        slot = Slot(self, policy, request_id)
        limits = policy.limits
        if self._redis is None or (
            limits.requests_per_minute is None and limits.concurrent_requests is None
        ):
            return slot
        lease_ms = int(self.lease_seconds * 1000)
        try:
            with store_errors("admit a request"):
                refused, detail, *reset = await self._redis.eval(
                    _ADMIT_REQUEST,
                    2,
                    self._key(policy.name, "rpm"),
                    self._key(policy.name, "inflight"),
                    request_id,
                    _limit(limits.requests_per_minute),
                    _limit(limits.concurrent_requests),
                    lease_ms,
                    WINDOW_MS,
                )
        except StoreUnavailable as exc:
            self._report(exc)
            return slot
        if refused == 1:
            raise self._rate_limited(
                policy,
                "requests_per_minute",
                f"{limits.requests_per_minute} requests per minute",
                int(detail),
            )
        if refused == 2:
            raise self._rate_limited(
                policy,
                "concurrent_requests",
                f"{limits.concurrent_requests} concurrent requests",
                CONCURRENCY_RETRY_MS,
            )
        if limits.concurrent_requests is not None:
            slot.leased = True
            slot._start_renewal()
        if limits.requests_per_minute is not None:
            # What OpenAI sends too, so clients can pace themselves before a 429.
            slot.headers = {
                "x-ratelimit-limit-requests": str(limits.requests_per_minute),
                "x-ratelimit-remaining-requests": str(max(int(detail), 0)),
                "x-ratelimit-reset-requests": f"{math.ceil(int(reset[0]) / 1000)}s",
            }
        return slot

    async def _admit_images(self, slot: Slot, n: int, period: QuotaPeriod) -> bool:
        """True when the images were charged in Redis (False: nothing to charge, or failed open)."""
        policy, limits = slot.policy, slot.policy.limits
        quota = limits.images_per_day is not None or limits.images_per_month is not None
        if self._redis is None or (limits.images_per_minute is None and not quota):
            return False
        day_key, month_key = self._quota_keys(policy.name, period)
        try:
            await self._flush_pending()
            with store_errors("admit images"):
                refused, detail = await self._redis.eval(
                    _ADMIT_IMAGES,
                    3,
                    self._key(policy.name, "ipm"),
                    day_key,
                    month_key,
                    slot.request_id,
                    n,
                    _limit(limits.images_per_minute),
                    _limit(limits.images_per_day),
                    _limit(limits.images_per_month),
                    DAY_TTL_SECONDS,
                    MONTH_TTL_SECONDS,
                    WINDOW_MS,
                )
        except StoreUnavailable as exc:
            self._report(exc)
            if quota:
                self._held.add(day_key, n, DAY_TTL_SECONDS)
                self._held.add(month_key, n, MONTH_TTL_SECONDS)
            return False
        if refused == 1:
            raise self._rate_limited(
                policy,
                "images_per_minute",
                f"{limits.images_per_minute} images per minute",
                int(detail),
            )
        if refused == 3:
            raise self._quota(
                policy, "images_per_day", limits.images_per_day, int(detail), n, period, "day"
            )
        if refused == 4:
            raise self._quota(
                policy,
                "images_per_month",
                limits.images_per_month,
                int(detail),
                n,
                period,
                "month",
            )
        return True

    async def _refund(self, slot: Slot, kept: int) -> None:
        if self._redis is None or slot._period is None:
            return
        day_key, month_key = self._quota_keys(slot.policy.name, slot._period)
        try:
            with store_errors("give back images"):
                await self._redis.eval(
                    _REFUND,
                    3,
                    self._key(slot.policy.name, "ipm"),
                    day_key,
                    month_key,
                    slot.request_id,
                    slot.charged_images,
                    slot.charged_images - kept,
                    kept,
                )
        except StoreUnavailable as exc:
            self._report(exc)

    async def _renew(self, slot: Slot) -> None:
        if self._redis is None:
            return
        try:
            with store_errors("renew a concurrency lease"):
                await self._redis.eval(
                    _RENEW,
                    1,
                    self._key(slot.policy.name, "inflight"),
                    slot.request_id,
                    int(self.lease_seconds * 1000),
                )
        except StoreUnavailable as exc:
            self._report(exc)

    async def _release(self, slot: Slot) -> None:
        if self._redis is None:
            return
        try:
            with store_errors("release a concurrency slot"):
                await self._redis.zrem(self._key(slot.policy.name, "inflight"), slot.request_id)
        except StoreUnavailable as exc:
            self._report(exc)

    async def quota_used(self, client: str) -> dict[str, int] | None:
        """Images charged this UTC day and month (None without Redis)."""
        if self._redis is None:
            return None
        period = QuotaPeriod.at(self.clock())
        day_key, month_key = self._quota_keys(client, period)
        with store_errors("read quotas"):
            day, month = await self._redis.mget([day_key, month_key])
        return {"images_today": int(day or 0), "images_this_month": int(month or 0)}

    def _quota_keys(self, client: str, period: QuotaPeriod) -> tuple[str, str]:
        return (
            self._key(client, f"images:day:{period.day}"),
            self._key(client, f"images:month:{period.month}"),
        )

    async def _flush_pending(self) -> None:
        if self._redis is None:
            return
        added = await self._held.flush(self._redis, "add the quota charges held meanwhile")
        if added:
            log.info("redis: added %d quota charges made while it was unreachable", added)

    def _rate_limited(
        self, policy: ClientPolicy, limit: str, phrase: str, wait_ms: int
    ) -> RateLimited:
        self._refused(policy, limit)
        wait_ms = max(wait_ms, 1)
        return RateLimited(
            f"Rate limit reached for this API key ({policy.name}): {phrase} (limit "
            f"{limit}). Retry after {math.ceil(wait_ms / 1000)} s.",
            code="rate_limit_exceeded",
            headers={
                "retry-after": str(math.ceil(wait_ms / 1000)),
                "retry-after-ms": str(wait_ms),
            },
        )

    def _quota(
        self,
        policy: ClientPolicy,
        limit: str,
        quota: int | None,
        used: int,
        n: int,
        period: QuotaPeriod,
        unit: str,
    ) -> QuotaExceeded:
        self._refused(policy, limit)
        reset = period.seconds_to_next_day if unit == "day" else period.seconds_to_next_month
        return QuotaExceeded(
            f"This API key ({policy.name}) has used {used} of its {quota} images this {unit} "
            f"(limit {limit}, UTC); {n} more would exceed it. The quota resets at the start of "
            f"the next UTC {unit}.",
            headers={
                "retry-after": str(math.ceil(reset)),
                # Retrying within the SDK's patience cannot help; say so.
                "x-should-retry": "false",
            },
        )

    def _refused(self, policy: ClientPolicy, limit: str) -> None:
        if self._on_refused is not None:
            self._on_refused(policy.name, limit)

    def _report(self, exc: StoreUnavailable) -> None:
        log.warning("redis: cannot %s, limits fail open (%s)", exc.action, exc.cause)
        if self._on_store_error is not None:
            self._on_store_error("client_limits")
