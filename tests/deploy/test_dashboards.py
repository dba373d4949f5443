"""Acceptance: every PromQL expression in the Grafana dashboard and the alert rules parses, and
every metric and label it selects is one the gateway exports (no dead panels, no silent alerts)."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from app.api import admin, files, health, images, models
from app.api import metrics as metrics_api
from app.keys.health import KeySnapshot
from app.observability.metrics import GatewayMetrics
from app.tenants.budgets import BudgetUse
from tests.support.prom import samples

CONFIG = Path(__file__).resolve().parents[2] / "config"
DASHBOARDS = sorted((CONFIG / "grafana" / "dashboards").glob("*.json"))
ALERTS = CONFIG / "prometheus-alerts.yml"
# Labels Prometheus itself adds to every scraped series, and its own per-target series.
TARGET_LABELS = {"job", "instance"}
PROMETHEUS_SERIES = {"up": TARGET_LABELS}
# Grafana's built-in variables, replaced as Grafana would before the query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "6h"}


def exported_series() -> dict[str, set[str]]:
    """Every series name the gateway exports, with its label names (each method exercised)."""
    metrics = GatewayMetrics(models=("m",), clients=("team",))
    metrics.request_started()
    metrics.request_finished(
        route="/v1/images/edits", model="m", status=200, seconds=1, bytes_in=1, bytes_out=1
    )
    metrics.record_upload("m", 1)
    metrics.record_images("m", 1)
    metrics.record_rejection("size")
    metrics.record_upstream("default", "m", "rate_limited", 1)
    metrics.record_retry("default", "rate_limited")
    metrics.record_failover("default", "backup")
    metrics.record_ejection_override("default", "panic")
    metrics.watch_keys(lambda: [KeySnapshot("default", "default#1", "cooling", "rate_limited", 3)])
    metrics.record_cache_lookup("m", "hit")
    metrics.record_cache_store("m", 1)
    metrics.record_cache_served("m", 1)
    metrics.record_cache_join("m")
    metrics.record_redis_error("cache")
    metrics.set_redis_up(True)
    metrics.record_client_edit("team-a", "m", outcome="ok", images=1, cost_usd=0.04)
    metrics.record_client_edit(
        "team", "m", outcome="cache_hit", images=1, cost_usd=0.0, saved_usd=0.04
    )

    async def budgets() -> list[BudgetUse]:
        return [BudgetUse("client", "team", "day", 0.5), BudgetUse("team", "design", "day", 0.2)]

    metrics.watch_budgets(budgets)
    asyncio.run(metrics.refresh_budgets())
    metrics.record_client_refusal("team-a", "images_per_day")
    asyncio.run(metrics.refresh_keys())
    metrics.record_client_edit("team", "m", outcome="ok", images=1, cost_usd=0.5)
    metrics.record_client_refusal("team", "requests_per_minute")
    series: dict[str, set[str]] = {}
    for name, labels, _ in samples(metrics.scrape().decode()):
        series.setdefault(name, set()).update(labels)
    return series


def dashboard_expressions(path: Path) -> Iterator[tuple[str, str]]:
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    dashboard = json.loads(path.read_text())
    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield f"{path.name}: {panel['title']} ({target['refId']})", target["expr"]


def alert_expressions() -> Iterator[tuple[str, str]]:
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"{ALERTS.name}: {rule.get('alert') or rule.get('record')}", rule["expr"]


def all_expressions() -> list[tuple[str, str]]:
    return [
        *(item for path in DASHBOARDS for item in dashboard_expressions(path)),
        *alert_expressions(),
    ]


def matchers(expr: str) -> list[tuple[str, Any]]:
    """(metric name, label matcher) for every label matcher in the expression."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    found: list[tuple[str, Any]] = []

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            found.append((node.name or "", None))
            found.extend((node.name or "", matcher) for matcher in node.matchers.matchers)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return found


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for every series selector in the expression."""
    found: list[tuple[str, set[str]]] = []
    for name, matcher in matchers(expr):
        if matcher is None:
            found.append((name, set()))
        elif matcher.name != "__name__":
            found[-1][1].add(matcher.name)
    return found


def app_routes() -> set[str]:
    routers = (models.router, health.router, files.router, admin.router, metrics_api.router)
    routes = [*images.routes, *(route for router in routers for route in router.routes)]
    return {route.path for route in routes}  # type: ignore[attr-defined]


def test_dashboards_and_alerts_exist() -> None:
    assert DASHBOARDS, "no dashboard under config/grafana/dashboards"
    names = {name for name, _ in alert_expressions()}
    for alert in (
        "UpstreamKeyDisabled",
        "UpstreamAllKeysCooling",
        "UpstreamPanicRouting",
        "Gateway5xxRatioHigh",
    ):
        assert any(alert in name for name in names)
    assert any("GatewayP99LatencyHigh" in name for name in names)
    assert any("RedisDown" in name for name in names)
    assert any("BudgetNearlySpent" in name for name in names)


def test_every_promql_expression_uses_exported_metrics_and_labels() -> None:
    exported = {**exported_series(), **PROMETHEUS_SERIES}
    problems = []
    for where, expr in all_expressions():
        for name, labels in selectors(expr):
            if name not in exported:
                problems.append(f"{where}: {name!r} is not exported by the gateway")
            elif unknown := labels - exported[name] - TARGET_LABELS:
                problems.append(f"{where}: {name} has no label(s) {sorted(unknown)}")
    assert not problems, "\n".join(problems)


def test_every_exported_metric_is_on_the_dashboard_or_in_an_alert() -> None:
    used = {name for _, expr in all_expressions() for name, _ in selectors(expr)}
    families = {
        name.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum")
        for name in exported_series()
        if not name.endswith("_created")
    }
    unused = {
        family
        for family in families
        if not any(name == family or name.startswith(family + "_") for name in used)
    }
    assert not unused, f"exported but shown nowhere: {sorted(unused)}"


def test_every_route_matcher_matches_a_real_route() -> None:
    routes = app_routes()
    assert "/v1/images/edits" in routes
    problems = []
    for where, expr in all_expressions():
        for _, matcher in matchers(expr):
            if matcher is None or matcher.name != "route":
                continue
            if str(matcher.op) == "MatchOp.Equal":
                matched = {matcher.value} & routes
            else:
                matched = {route for route in routes if re.fullmatch(matcher.value, route)}
            if not matched:
                problems.append(f"{where}: route matcher {matcher.value!r} matches no route")
    assert not problems, "\n".join(problems)


def test_selector_check_catches_a_dead_panel() -> None:
    exported = exported_series()
    ((name, labels),) = selectors('sum(rate(gateway_requets_total{route="/x"}[5m]))')
    assert name not in exported  # the typo is caught
    ((name, labels),) = selectors('sum(rate(gateway_requests_total{path="/x"}[$__rate_interval]))')
    assert name in exported and labels - exported[name] == {"path"}
