"""Prometheus metrics behind intent-named methods: the rest of the gateway says what happened
(`record_upstream(...)`), never which collector to touch.

Every label value is bounded: routes are route templates, models come from the catalog, params
from the images API's field names, keys are key ids, clients are names from configuration
(runtime keys belong to a configured client). A client-supplied string never becomes a
label value, so no client can grow the series count or smuggle text into the scrape.

Every labelled series a shipped dashboard or alert reads exists from startup, at 0, for the label
values configuration makes known (`show_known_series_at_zero`): an operator then tells "nothing
happened" (0) from "not measured" (no data), and `rate()` sees a series' first increment (a
series born at 1 has no earlier 0 to rise from).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Final, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from app.config.catalog import KNOWN_PARAMS
from app.errors import FailureKind
from app.keys.health import KeySnapshot, KeyStatus
from app.tenants.budgets import PERIODS, BudgetUse

log = logging.getLogger("gateway.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Client-facing requests are short when cached and up to 10 minutes for slow upstream edits.
REQUEST_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600,
)  # fmt: skip
UPSTREAM_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 240, 300, 450, 600,
)  # fmt: skip

KEY_STATES: Final[tuple[KeyStatus, ...]] = ("healthy", "cooling", "disabled", "ejected")
CacheResult = Literal["hit", "miss", "bypass"]
CACHE_RESULTS: Final[tuple[CacheResult, ...]] = ("hit", "miss", "bypass")
_CACHE_RESULTS: Final = frozenset(CACHE_RESULTS)

# Why a key is not healthy: the upstream failure kinds, plus the pool's own reasons.
KEY_REASONS: Final = frozenset({"ok", "probe_failed", "manual", *get_args(FailureKind)})
# Why an ejected key served an attempt (app/keys/outliers.py).
EJECTION_OVERRIDES: Final = frozenset({"cap", "panic"})
# What an upstream call ended with: "ok", "cancelled", or one of app.errors.FailureKind.
UPSTREAM_OUTCOMES: Final = frozenset({"ok", "cancelled", *get_args(FailureKind)})
# Fields a validation error can name, besides the optional images API fields.
_REQUEST_FIELDS: Final = frozenset({"image", "mask", "markup", "prompt", "model"})
_INDEXED = re.compile(r"^(image|mask|markup)\[\d*\]$")
REDIS_COMPONENTS: Final = frozenset(
    {"cache", "keys", "health", "client_keys", "client_limits", "client_usage"}
)
# What a client's edit ended with, and which of its limits can refuse it.
CLIENT_OUTCOMES: Final = frozenset({"ok", "cache_hit", "error"})
CLIENT_LIMITS: Final = frozenset(
    {
        "requests_per_minute",
        "images_per_minute",
        "concurrent_requests",
        "images_per_day",
        "images_per_month",
        "budget_usd_per_day",
        "budget_usd_per_month",
        "team_budget_usd_per_day",
        "team_budget_usd_per_month",
        "model_not_allowed",
    }
)

OTHER = "other"
NONE = "none"
# The status classes dashboards and alerts select (the 5xx ratio above all).
STATUS_CLASSES: Final = ("2xx", "4xx", "5xx")
# Where a client's images came from.
IMAGE_SOURCES: Final = ("upstream", "cache")


# The key pool's view: read in memory, or from Redis (hence awaitable) when the pool shares state.
KeySource = Callable[[], Iterable[KeySnapshot] | Awaitable[Iterable[KeySnapshot]]]
# A key source slower than this (Redis in trouble) leaves the previous snapshot in the scrape.
KEY_REFRESH_SECONDS = 2.0
# Spend budgets as Redis holds them (app/tenants/budgets.py), read before each scrape.
BudgetSource = Callable[[], Awaitable[Iterable[BudgetUse]]]


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else OTHER


def bounded(value: str | None, allowed: frozenset[str]) -> str:
    if value is None:
        return NONE
    return value if value in allowed else OTHER


def rejection_param(param: str | None) -> str:
    """`image[3]` counts as `image`; a field the images API does not define counts as `other`."""
    if param is None:
        return NONE
    indexed = _INDEXED.match(param)
    if indexed is not None:
        return indexed.group(1)
    return param if param in _REQUEST_FIELDS or param in KNOWN_PARAMS else OTHER


class _KeyCollector(Collector):
    """Key state as the pool reported it at the start of this scrape (see `refresh_keys`)."""

    def __init__(self) -> None:
        self.keys: list[KeySnapshot] = []

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "gateway_upstream_key_state",
            "1 for the state each upstream key is in (with the reason), 0 for the others.",
            labels=["upstream", "key", "state", "reason"],
        )
        cooldown = GaugeMetricFamily(
            "gateway_upstream_key_cooldown_seconds",
            "Seconds until a cooling, disabled or ejected key is tried again (0 when healthy).",
            labels=["upstream", "key"],
        )
        for key in self.keys:
            reason = bounded(key.reason, KEY_REASONS)
            for candidate in KEY_STATES:
                value = 1.0 if candidate == key.state else 0.0
                shown = reason if candidate == key.state else NONE
                state.add_metric([key.upstream, key.key_id, candidate, shown], value)
            cooldown.add_metric([key.upstream, key.key_id], max(0.0, key.cooldown_seconds))
        yield state
        yield cooldown


class _BudgetCollector(Collector):
    """Spent / budget per client and team, this UTC day and month, as Redis held them at the
    start of this scrape (see `refresh_budgets`): every replica reads the same shared spend, and
    a new day reads 0 without waiting for a request. A client without a budget reads 0."""

    def __init__(self) -> None:
        self.ratios: dict[tuple[str, str, str], float] = {}

    def collect(self) -> Iterator[Metric]:
        families = {
            "client": GaugeMetricFamily(
                "gateway_client_budget_used_ratio",
                "Share of a client's spend budget used this UTC day or month (spent and "
                "reserved / budget; 0 without a budget).",
                labels=["client", "period"],
            ),
            "team": GaugeMetricFamily(
                "gateway_team_budget_used_ratio",
                "Share of a team's spend budget used this UTC day or month (spent and "
                "reserved / budget).",
                labels=["team", "period"],
            ),
        }
        for (kind, name, period), ratio in sorted(self.ratios.items()):
            families[kind].add_metric([name, period], ratio)
        yield from families.values()


class GatewayMetrics:
    """The gateway's collectors, in a registry of their own (so tests can build many apps).

    With `multiprocess_dir` (uvicorn `--workers N`), prometheus-client keeps every value in
    per-process files there and a scrape of any worker sums them all.
    """

    def __init__(
        self,
        *,
        models: Iterable[str],
        multiprocess_dir: str | None = None,
        clients: Iterable[str] = (),
    ) -> None:
        self._models = frozenset(models)
        self._clients = frozenset(clients)
        self._multiprocess_dir = multiprocess_dir
        self.registry = CollectorRegistry()
        self._key_sources: list[KeySource] = []
        self._key_collector = _KeyCollector()
        self.registry.register(self._key_collector)
        self._budget_sources: list[BudgetSource] = []
        self._budget_collector = _BudgetCollector()
        self.registry.register(self._budget_collector)
        r = self.registry

        self._requests = Counter(
            "gateway_requests",
            "HTTP requests answered, by route template, catalog model and status class.",
            ["route", "model", "status_class"],
            registry=r,
        )
        self._request_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time from the first byte of a request to the last byte of its response.",
            ["route", "model"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self._in_flight = Gauge(
            "gateway_requests_in_flight",
            "Client requests being handled right now (health probes and scrapes excluded).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self._request_bytes = Counter(
            "gateway_request_bytes",
            "Request body bytes received.",
            ["route"],
            registry=r,
        )
        self._response_bytes = Counter(
            "gateway_response_bytes",
            "Response body bytes sent.",
            ["route"],
            registry=r,
        )
        self._upload_bytes = Counter(
            "gateway_upload_bytes",
            "Bytes of uploaded image and mask files in accepted multipart forms.",
            ["model"],
            registry=r,
        )
        self._images = Counter(
            "gateway_images_returned",
            "Images returned to clients (from the upstream or the cache).",
            ["model"],
            registry=r,
        )
        self._rejections = Counter(
            "gateway_validation_rejections",
            "Requests refused before reaching an upstream, by the field at fault.",
            ["param"],
            registry=r,
        )
        self._upstream_requests = Counter(
            "gateway_upstream_requests",
            "Calls to an upstream, by outcome (ok or the failure kind).",
            ["upstream", "model", "outcome"],
            registry=r,
        )
        self._upstream_seconds = Histogram(
            "gateway_upstream_duration_seconds",
            "Time an upstream took to answer one call (successful or not).",
            ["upstream", "model"],
            buckets=UPSTREAM_BUCKETS,
            registry=r,
        )
        self._upstream_errors = Counter(
            "gateway_upstream_errors",
            "Failed upstream calls, by kind: rate_limited (429), auth (401/403), quota (402), "
            "server (5xx), connect, timeout, dropped, rejected (other 4xx), bad_response.",
            ["upstream", "kind"],
            registry=r,
        )
        self._retries = Counter(
            "gateway_upstream_retries",
            "Further attempts at a request after a failed call, by the failure that caused them.",
            ["upstream", "reason"],
            registry=r,
        )
        self._ejection_overrides = Counter(
            "gateway_upstream_ejection_overrides",
            "Attempts sent to an ejected key: panic (no key of the upstream was usable) or cap "
            "(more keys ejected than pool.max_ejected_share allows).",
            ["upstream", "reason"],
            registry=r,
        )
        self._failovers = Counter(
            "gateway_upstream_failovers",
            "Requests moved from one upstream to another.",
            ["from_upstream", "to_upstream"],
            registry=r,
        )
        self._cache_lookups = Counter(
            "gateway_cache_lookups",
            "Answered edits by cache result: hit (an entry, or a joined identical call in "
            "flight), miss (paid upstream), bypass (cache not used).",
            ["model", "result"],
            registry=r,
        )
        self._cache_stores = Counter(
            "gateway_cache_stores",
            "Responses written to the result cache.",
            ["model"],
            registry=r,
        )
        self._cache_stored_bytes = Counter(
            "gateway_cache_stored_bytes",
            "Bytes written to the result cache.",
            ["model"],
            registry=r,
        )
        self._cache_served_bytes = Counter(
            "gateway_cache_served_bytes",
            "Image bytes served from the result cache instead of an upstream.",
            ["model"],
            registry=r,
        )
        self._cache_joins = Counter(
            "gateway_cache_singleflight_joins",
            "Requests that waited for an identical in-flight edit instead of calling upstream.",
            ["model"],
            registry=r,
        )
        self._redis_errors = Counter(
            "gateway_redis_errors",
            "Redis commands that failed or timed out, by the component that issued them.",
            ["component"],
            registry=r,
        )
        self._client_requests = Counter(
            "gateway_client_requests",
            "Edits per client and model, by outcome (ok, cache_hit, error).",
            ["client", "model", "outcome"],
            registry=r,
        )
        self._client_images = Counter(
            "gateway_client_images",
            "Images delivered per client and model, by source (upstream, cache).",
            ["client", "model", "source"],
            registry=r,
        )
        self._client_cost = Counter(
            "gateway_client_cost_usd",
            "Estimated upstream spend per client and model, in USD (prices from the catalog).",
            ["client", "model"],
            registry=r,
        )
        self._client_saved = Counter(
            "gateway_client_saved_usd",
            "Estimated upstream spend the cache saved per client and model, in USD (what its "
            "hits would have cost).",
            ["client", "model"],
            registry=r,
        )
        self._client_refusals = Counter(
            "gateway_client_refusals",
            "Requests refused by a client's limit, quota or model permission.",
            ["client", "limit"],
            registry=r,
        )
        # Created on the first check: a gateway without Redis must not report it down.
        self._redis_up: Gauge | None = None

    def show_known_series_at_zero(
        self,
        *,
        routes: Iterable[str],
        served_models: Mapping[str, Iterable[str]],
        clients: Iterable[str],
        redis: bool,
        teams: Iterable[str] = (),
    ) -> None:
        """Create, at 0, every series the dashboards and alerts read for the label values known
        from configuration: `routes` (the image routes), the catalog's models, `served_models`
        (upstream -> the models it serves), `clients` (those that can send requests), `teams`,
        and Redis' components when `redis`. Bounded by configuration: no label value here comes
        from a request.
        """
        routes = tuple(routes)
        models = sorted(self._models)
        served = {upstream: sorted(set(names)) for upstream, names in served_models.items()}
        failures = sorted(get_args(FailureKind))
        for route in routes:
            self._request_bytes.labels(route)
            self._response_bytes.labels(route)
            for model in models:
                self._request_seconds.labels(route, model)
                for status in STATUS_CLASSES:
                    self._requests.labels(route, model, status)
        for model in models:
            self._upload_bytes.labels(model)
            self._images.labels(model)
            self._cache_stores.labels(model)
            self._cache_stored_bytes.labels(model)
            self._cache_served_bytes.labels(model)
            self._cache_joins.labels(model)
            for result in CACHE_RESULTS:
                self._cache_lookups.labels(model, result)
        for param in sorted({*_REQUEST_FIELDS, *KNOWN_PARAMS, OTHER, NONE}):
            self._rejections.labels(param)
        for upstream, upstream_models in served.items():
            for model in upstream_models:
                self._upstream_seconds.labels(upstream, self.model_label(model))
                for outcome in sorted(UPSTREAM_OUTCOMES):
                    self._upstream_requests.labels(upstream, self.model_label(model), outcome)
            for kind in failures:
                self._upstream_errors.labels(upstream, kind)
                self._retries.labels(upstream, kind)
            for reason in sorted(EJECTION_OVERRIDES):
                self._ejection_overrides.labels(upstream, reason)
            # A failover moves a request to another upstream serving the same model.
            for other, other_models in served.items():
                if other != upstream and set(upstream_models) & set(other_models):
                    self._failovers.labels(upstream, other)
        for client in sorted(set(clients) & self._clients):
            for limit in sorted(CLIENT_LIMITS):
                self._client_refusals.labels(client, limit)
            for period in PERIODS:
                self._budget_collector.ratios[("client", client, period)] = 0.0
            for model in models:
                self._client_cost.labels(client, model)
                self._client_saved.labels(client, model)
                for outcome in sorted(CLIENT_OUTCOMES):
                    self._client_requests.labels(client, model, outcome)
                for source in IMAGE_SOURCES:
                    self._client_images.labels(client, model, source)
        for team in teams:
            for period in PERIODS:
                self._budget_collector.ratios[("team", team, period)] = 0.0
        if redis:
            for component in sorted(REDIS_COMPONENTS):
                self._redis_errors.labels(component)

    # Requests (the observability middleware calls these).
    def model_label(self, model: str | None) -> str:
        return bounded(model, self._models)

    def request_started(self) -> None:
        self._in_flight.inc()

    def request_ended(self) -> None:
        self._in_flight.dec()

    def request_finished(
        self,
        *,
        route: str,
        model: str | None,
        status: int,
        seconds: float,
        bytes_in: int,
        bytes_out: int,
    ) -> None:
        model_label = self.model_label(model)
        self._requests.labels(route, model_label, status_class(status)).inc()
        self._request_seconds.labels(route, model_label).observe(seconds)
        if bytes_in:
            self._request_bytes.labels(route).inc(bytes_in)
        if bytes_out:
            self._response_bytes.labels(route).inc(bytes_out)

    def record_upload(self, model: str | None, nbytes: int) -> None:
        self._upload_bytes.labels(self.model_label(model)).inc(nbytes)

    def record_images(self, model: str | None, count: int) -> None:
        self._images.labels(self.model_label(model)).inc(count)

    def record_rejection(self, param: str | None) -> None:
        self._rejections.labels(rejection_param(param)).inc()

    # Upstream calls (the forwarder and key pool call these).
    def record_upstream(self, upstream: str, model: str, outcome: str, seconds: float) -> None:
        kind = bounded(outcome, UPSTREAM_OUTCOMES)
        model_label = self.model_label(model)
        self._upstream_requests.labels(upstream, model_label, kind).inc()
        self._upstream_seconds.labels(upstream, model_label).observe(seconds)
        if kind not in ("ok", "cancelled"):
            self._upstream_errors.labels(upstream, kind).inc()

    def record_retry(self, upstream: str, reason: str) -> None:
        self._retries.labels(upstream, bounded(reason, UPSTREAM_OUTCOMES)).inc()

    def record_ejection_override(self, upstream: str, reason: str) -> None:
        self._ejection_overrides.labels(upstream, bounded(reason, EJECTION_OVERRIDES)).inc()

    def record_failover(self, from_upstream: str, to_upstream: str) -> None:
        self._failovers.labels(from_upstream, to_upstream).inc()

    def watch_keys(self, source: KeySource) -> None:
        """Report the keys `source` lists (state, reason, cooldown left) on every scrape."""
        self._key_sources.append(source)

    async def refresh_keys(self) -> None:
        """Ask every key source for its keys now; /metrics calls this before `scrape()`."""
        keys: list[KeySnapshot] = []
        try:
            async with asyncio.timeout(KEY_REFRESH_SECONDS):
                for source in self._key_sources:
                    found = source()
                    keys.extend(await found if inspect.isawaitable(found) else found)
        except Exception:
            log.warning("key state unavailable for this scrape; showing the previous one")
            return
        self._key_collector.keys = keys

    def watch_budgets(self, source: BudgetSource) -> None:
        """Report the spend budgets `source` lists (spent / budget) on every scrape."""
        self._budget_sources.append(source)

    async def refresh_budgets(self) -> None:
        """Ask every budget source for its spend now; /metrics calls this before `scrape()`.
        Redis slow or down: the previous values stay in the scrape."""
        ratios: dict[tuple[str, str, str], float] = {}
        try:
            async with asyncio.timeout(KEY_REFRESH_SECONDS):
                for source in self._budget_sources:
                    for use in await source():
                        ratios[(use.kind, use.name, use.period)] = use.ratio
        except Exception:
            log.warning("budgets unavailable for this scrape; showing the previous values")
            return
        self._budget_collector.ratios.update(ratios)

    # The result cache.
    def record_cache_lookup(self, model: str, result: CacheResult) -> None:
        self._cache_lookups.labels(self.model_label(model), bounded(result, _CACHE_RESULTS)).inc()

    def record_cache_store(self, model: str, nbytes: int) -> None:
        model_label = self.model_label(model)
        self._cache_stores.labels(model_label).inc()
        self._cache_stored_bytes.labels(model_label).inc(nbytes)

    def record_cache_served(self, model: str, nbytes: int) -> None:
        self._cache_served_bytes.labels(self.model_label(model)).inc(nbytes)

    def record_cache_join(self, model: str) -> None:
        self._cache_joins.labels(self.model_label(model)).inc()

    # Clients (the client gate and limiter call these).
    def record_client_edit(
        self,
        client: str,
        model: str,
        *,
        outcome: str,
        images: int,
        cost_usd: float,
        saved_usd: float = 0.0,
    ) -> None:
        client_label = bounded(client, self._clients)
        model_label = self.model_label(model)
        outcome_label = bounded(outcome, CLIENT_OUTCOMES)
        self._client_requests.labels(client_label, model_label, outcome_label).inc()
        if images:
            source = "cache" if outcome == "cache_hit" else "upstream"
            self._client_images.labels(client_label, model_label, source).inc(images)
        if cost_usd:
            self._client_cost.labels(client_label, model_label).inc(cost_usd)
        if saved_usd:
            self._client_saved.labels(client_label, model_label).inc(saved_usd)

    def record_client_refusal(self, client: str, limit: str) -> None:
        self._client_refusals.labels(
            bounded(client, self._clients), bounded(limit, CLIENT_LIMITS)
        ).inc()

    # Redis.
    def record_redis_error(self, component: str) -> None:
        self._redis_errors.labels(bounded(component, REDIS_COMPONENTS)).inc()

    def set_redis_up(self, up: bool) -> None:
        if self._redis_up is None:
            self._redis_up = Gauge(
                "gateway_redis_up",
                "1 when the last Redis health check passed, 0 when it failed.",
                registry=self.registry,
                multiprocess_mode="livemin",
            )
        self._redis_up.set(1 if up else 0)

    # Exposition.
    def scrape(self) -> bytes:
        """The text exposition of every metric (all workers' in multiprocess mode)."""
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        # prometheus-client's multiprocess module is untyped.
        MultiProcessCollector(merged, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
        # Key state is this worker's view of the pool (shared through Redis when configured).
        merged.register(self._key_collector)
        # Budgets are read from Redis, the same for every worker.
        merged.register(self._budget_collector)
        return generate_latest(merged)

    def close(self) -> None:
        """Tell prometheus-client this worker is gone, so its live gauges stop counting."""
        if self._multiprocess_dir is not None:
            mark_process_dead(os.getpid(), self._multiprocess_dir)  # type: ignore[no-untyped-call]
