"""Spend budgets in USD per client and per team of clients, by UTC day and month, shared by every
replica through Redis.

Before anything is paid for (after the image quotas, before the cache and the upstream), a request
reserves its worst-case cost (`worst_case_cost_nanos`: its images at their most tokens, at the
catalog's prices). A request that would take a budget past its limit is refused with 429
insufficient_quota and never reaches the upstream. After the call the reservation is settled:
replaced by the answer's cost (`estimate_cost_nanos`), given back whole for a cache hit or for a
failure the upstream did not bill, kept whole after a failure it may have billed
(app.errors.MAYBE_BILLED). A model without a price costs 0 and never touches a budget.

Redis layout, integer nano-dollars spent (and reserved by requests in flight), one hash tag per
owner so each owner's script stays on one Redis Cluster slot:
  <ns>:{client:<name>}:budget:day:<YYYYMMDD>    <ns>:{client:<name>}:budget:month:<YYYYMM>
  <ns>:{team:<name>}:budget:day:<YYYYMMDD>      <ns>:{team:<name>}:budget:month:<YYYYMM>
An owner's day and month are reserved by one Lua script (atomic: both or neither). A client and
its team are two hash tags, so two slots under Redis Cluster, where no script may touch both: the
client's budget is reserved first, then the team's, and the client's reservation is given back if
the team's refuses. Between the two steps another request of the client may see a reservation
that is about to be given back: it can be refused early, never let past a limit.

When Redis is unreachable budgets fail open, like every client limit (app/tenants/limiter.py): an
outage of the shared store must not stop every team's work. The failure is logged and counted
(`gateway_redis_errors_total{component="client_limits"}`), and what requests answered meanwhile
cost is held here and added once Redis answers again, so spend catches up with what was used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

import redis.asyncio as aioredis

from app.config.tenants import ClientLimits, ClientsConfig
from app.errors import QuotaExceeded, StoreUnavailable
from app.shared_state.failures import store_errors
from app.tenants.held import HeldIncrements
from app.tenants.limiter import DAY_TTL_SECONDS, MONTH_TTL_SECONDS, QuotaPeriod
from app.tenants.usage import NANOS_PER_USD, usd_float

log = logging.getLogger("gateway.clients")

Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")
OwnerKind = Literal["client", "team"]
UNLIMITED = -1

# KEYS: day, month. ARGV: amount (nano-USD), day limit, month limit (-1: none), day ttl s,
# month ttl s. Returns {0, 0} when reserved, else {1 (day) | 2 (month), nano-USD used}.
_RESERVE = """
local amount = tonumber(ARGV[1])
for i = 1, 2 do
  local limit = tonumber(ARGV[1 + i])
  if limit >= 0 then
    local used = tonumber(redis.call('GET', KEYS[i]) or '0')
    if used + amount > limit then return {i, used} end
  end
end
for i = 1, 2 do
  redis.call('INCRBY', KEYS[i], amount)
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[3 + i]))
end
return {0, 0}
"""

# KEYS: day, month. ARGV: change (nano-USD, negative to give back), day ttl s, month ttl s.
_ADJUST = """
for i = 1, 2 do
  if redis.call('INCRBY', KEYS[i], ARGV[1]) < 0 then redis.call('SET', KEYS[i], 0) end
  redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1 + i]))
end
return 1
"""


def to_nanos(usd: Decimal | None) -> int | None:
    return None if usd is None else int((usd * NANOS_PER_USD).to_integral_value())


def dollars(nanos: int) -> str:
    """$0.10, $12.50, $0.0004: cents always, more digits only where they say something."""
    text = f"{Decimal(nanos) / NANOS_PER_USD:.9f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


@dataclass(frozen=True, slots=True)
class Budget:
    """One owner's budgets in nano-USD (None: no budget for that period)."""

    kind: OwnerKind
    name: str
    per_day: int | None
    per_month: int | None

    @classmethod
    def of(
        cls, kind: OwnerKind, name: str, day: Decimal | None, month: Decimal | None
    ) -> Budget | None:
        budget = cls(kind, name, to_nanos(day), to_nanos(month))
        return budget if budget.per_day is not None or budget.per_month is not None else None

    def limit(self, period: Period) -> int | None:
        return self.per_day if period == "day" else self.per_month


@dataclass(frozen=True, slots=True)
class BudgetUse:
    """What share of one budget is spent this UTC day or month (for the metrics)."""

    kind: OwnerKind
    name: str
    period: Period
    ratio: float


class Budgets:
    def __init__(
        self,
        redis: aioredis.Redis | None,
        *,
        namespace: str,
        clients: Mapping[str, Budget],
        teams: Mapping[str, Budget] | None = None,
        team_of: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        on_store_error: Callable[[str], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._namespace = namespace
        self._clients = dict(clients)
        self._teams = dict(teams or {})
        self._team_of = dict(team_of or {})
        self.clock = clock
        self._on_store_error = on_store_error
        self._on_refused = on_refused
        # Spend recorded while Redis was unreachable (nano-USD).
        self._held = HeldIncrements()

    @classmethod
    def from_config(
        cls,
        redis: aioredis.Redis | None,
        config: ClientsConfig,
        limits: Mapping[str, ClientLimits],
        *,
        on_store_error: Callable[[str], None] | None = None,
        on_refused: Callable[[str, str], None] | None = None,
    ) -> Budgets:
        """Budgets for every client (`limits`: each one's, defaults applied) and every team."""
        clients = {}
        for name, client in limits.items():
            own = Budget.of("client", name, client.budget_usd_per_day, client.budget_usd_per_month)
            if own is not None:
                clients[name] = own
        teams = {}
        for name, team in config.teams.items():
            shared = Budget.of("team", name, team.budget_usd_per_day, team.budget_usd_per_month)
            if shared is not None:
                teams[name] = shared
        return cls(
            redis,
            namespace=config.namespace,
            clients=clients,
            teams=teams,
            team_of={name: found for name in limits if (found := config.team_of(name))},
            on_store_error=on_store_error,
            on_refused=on_refused,
        )

    def budgets_of(self, client: str) -> list[Budget]:
        """The client's own budget, then its team's (either may be absent)."""
        found = [self._clients.get(client)]
        team = self._team_of.get(client)
        if team is not None:
            found.append(self._teams.get(team))
        return [budget for budget in found if budget is not None]

    @property
    def all(self) -> list[Budget]:
        return [*self._clients.values(), *self._teams.values()]

    async def reserve(self, client: str, amount: int) -> Reservation:
        """Reserve `amount` nano-USD (the request's worst case) on the client's budget and its
        team's, or raise QuotaExceeded having reserved nothing."""
        period = QuotaPeriod.at(self.clock())
        reservation = Reservation(self, period, amount, self.budgets_of(client))
        if not reservation.budgets or amount <= 0 or self._redis is None:
            return reservation
        for budget in reservation.budgets:
            day_key, month_key = self._keys(budget, period)
            try:
                await self._flush_pending()
                with store_errors("reserve budget"):
                    refused, used = await self._redis.eval(
                        _RESERVE,
                        2,
                        day_key,
                        month_key,
                        amount,
                        _limit(budget.per_day),
                        _limit(budget.per_month),
                        DAY_TTL_SECONDS,
                        MONTH_TTL_SECONDS,
                    )
            except StoreUnavailable as exc:
                self._report(exc)
                continue  # fails open; what the request costs is added when it settles
            if refused:
                # The client's reservation, when the team's refuses (Cluster: two slots).
                await reservation.settle(0)
                raise self._over(client, budget, PERIODS[int(refused) - 1], int(used), amount)
            reservation.held.add(budget)
        return reservation

    async def _adjust(self, budget: Budget, period: QuotaPeriod, change: int) -> None:
        day_key, month_key = self._keys(budget, period)
        if self._redis is None:
            return
        try:
            with store_errors("settle budget"):
                await self._redis.eval(
                    _ADJUST, 2, day_key, month_key, change, DAY_TTL_SECONDS, MONTH_TTL_SECONDS
                )
        except StoreUnavailable as exc:
            self._report(exc)
            self._held.add(day_key, change, DAY_TTL_SECONDS)
            self._held.add(month_key, change, MONTH_TTL_SECONDS)

    async def used_ratios(self) -> list[BudgetUse]:
        """Spent / budget for every budget set, this UTC day and month (a budget of 0 reads 1:
        it is all spent). Raises StoreUnavailable when Redis cannot say."""
        if self._redis is None:
            return []
        period = QuotaPeriod.at(self.clock())
        wanted = [
            (budget, name, key, limit)
            for budget in self.all
            for name, key in zip(PERIODS, self._keys(budget, period), strict=True)
            if (limit := budget.limit(name)) is not None
        ]
        if not wanted:
            return []
        with store_errors("read budgets"):
            # One key per command: fine on Redis Cluster, where owners sit on different slots.
            async with self._redis.pipeline(transaction=False) as pipe:
                for _, _, key, _ in wanted:
                    pipe.get(key)
                spent = await pipe.execute()
        return [
            BudgetUse(budget.kind, budget.name, name, int(used or 0) / limit if limit else 1.0)
            for (budget, name, _, limit), used in zip(wanted, spent, strict=True)
        ]

    async def spent(self, client: str) -> list[dict[str, object]]:
        """The client's budgets and its team's, with what is spent this UTC day and month, for
        /admin/clients/<name>. Raises StoreUnavailable when Redis cannot say."""
        budgets = self.budgets_of(client)
        if self._redis is None or not budgets:
            return []
        period = QuotaPeriod.at(self.clock())
        with store_errors("read budgets"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for budget in budgets:
                    for key in self._keys(budget, period):
                        pipe.get(key)
                values = await pipe.execute()
        shown: list[dict[str, object]] = []
        for number, budget in enumerate(budgets):
            day, month = (int(value or 0) for value in values[2 * number : 2 * number + 2])
            shown.append(
                {
                    "owner": budget.kind,
                    "name": budget.name,
                    "budget_usd_per_day": _usd(budget.per_day),
                    "budget_usd_per_month": _usd(budget.per_month),
                    "spent_usd_today": _usd(day),
                    "spent_usd_this_month": _usd(month),
                }
            )
        return shown

    def _keys(self, budget: Budget, period: QuotaPeriod) -> tuple[str, str]:
        tag = f"{self._namespace}:{{{budget.kind}:{budget.name}}}:budget"
        return f"{tag}:day:{period.day}", f"{tag}:month:{period.month}"

    async def _flush_pending(self) -> None:
        if self._redis is None:
            return
        added = await self._held.flush(self._redis, "add the spend recorded meanwhile")
        if added:
            log.info("redis: added the spend of %d budgets made while it was unreachable", added)

    def _over(
        self, client: str, budget: Budget, period: Period, used: int, amount: int
    ) -> QuotaExceeded:
        limit = f"budget_usd_per_{period}"
        if self._on_refused is not None:
            self._on_refused(client, limit if budget.kind == "client" else f"team_{limit}")
        whose = (
            f"client {client!r}"
            if budget.kind == "client"
            else f"team {budget.name!r} (of client {client!r})"
        )
        adjective = "daily" if period == "day" else "monthly"
        periods = QuotaPeriod.at(self.clock())
        reset = periods.seconds_to_next_day if period == "day" else periods.seconds_to_next_month
        return QuotaExceeded(
            f"The {whose} is over its {adjective} budget of {dollars(budget.limit(period) or 0)} "
            f"(spent {dollars(used)}, requests in flight included; this request may cost up to "
            f"{dollars(amount)}; limit {'' if budget.kind == 'client' else 'team '}{limit}). "
            f"The budget resets at the start of the next UTC {period}.",
            headers={
                "retry-after": str(max(1, int(reset))),
                # Retrying within the SDK's patience cannot help; say so.
                "x-should-retry": "false",
            },
        )

    def _report(self, exc: StoreUnavailable) -> None:
        log.warning("redis: cannot %s, budgets fail open (%s)", exc.action, exc.cause)
        if self._on_store_error is not None:
            self._on_store_error("client_limits")


@dataclass(eq=False)
class Reservation:
    """One request's reservation on its budgets, settled once."""

    _budgets: Budgets
    period: QuotaPeriod
    amount: int  # nano-USD reserved on each budget in `held`
    budgets: list[Budget]
    # Budgets Redis holds the reservation on (the others failed open).
    held: set[Budget] = field(default_factory=set)
    settled: bool = False

    async def settle(self, cost: int | None) -> None:
        """Replace the reservation by what the request cost, in nano-USD: 0 gives it all back
        (a cache hit, a failure the upstream did not bill); None keeps it (the upstream may have
        billed it). A budget whose reservation failed open is charged the cost now."""
        if self.settled:
            return
        self.settled = True
        spent = self.amount if cost is None else cost
        for budget in self.budgets:
            change = spent - self.amount if budget in self.held else spent
            if change:
                await self._budgets._adjust(budget, self.period, change)


def _usd(nanos: int | None) -> float | None:
    return None if nanos is None else usd_float(nanos)


def _limit(value: int | None) -> int:
    return UNLIMITED if value is None else value
