"""show_known_series_at_zero: every series the dashboards and alerts read exists at 0 from
startup, for the label values configuration makes known, and for no others."""

from __future__ import annotations

from app.observability.metrics import CLIENT_LIMITS, REDIS_COMPONENTS, GatewayMetrics
from tests.support.prom import label_values, samples

MODELS = ("gpt-image-1.5", "flux-kontext-pro", "dall-e-2")
ROUTES = ("/v1/images/edits", "/v1/images/generations")
CLIENTS = ("anonymous", "client-1", "design")
# `backup` serves only flux-kontext-pro; `solo` serves nothing (no failover pairs).
SERVED = {
    "default": ["gpt-image-1.5", "flux-kontext-pro", "dall-e-2"],
    "backup": ["flux-kontext-pro"],
    "solo": [],
}


def started(*, redis: bool = True, clients: tuple[str, ...] = CLIENTS) -> str:
    metrics = GatewayMetrics(models=MODELS, clients=CLIENTS)
    metrics.show_known_series_at_zero(
        routes=ROUTES, served_models=SERVED, clients=clients, redis=redis, teams=("design",)
    )
    return metrics.scrape().decode()


def series(text: str, name: str) -> list[dict[str, str]]:
    return [labels for sample, labels, _ in samples(text) if sample == name]


def test_known_series_start_at_zero() -> None:
    text = started()
    values = [value for name, _, value in samples(text) if not name.endswith("_created")]
    assert values and set(values) == {0.0}
    requests = series(text, "gateway_requests_total")
    assert {(s["route"], s["model"], s["status_class"]) for s in requests} == {
        (route, model, status)
        for route in ROUTES
        for model in MODELS
        for status in ("2xx", "4xx", "5xx")
    }
    assert label_values(text, "gateway_cache_lookups_total", "result") == {"hit", "miss", "bypass"}
    assert label_values(text, "gateway_client_refusals_total", "client") == set(CLIENTS)
    assert label_values(text, "gateway_client_refusals_total", "limit") == set(CLIENT_LIMITS)
    assert label_values(text, "gateway_redis_errors_total", "component") == set(REDIS_COMPONENTS)
    assert label_values(text, "gateway_upstream_errors_total", "upstream") == set(SERVED)
    assert {"rate_limited", "server", "timeout"} <= label_values(
        text, "gateway_upstream_errors_total", "kind"
    )
    assert label_values(text, "gateway_request_duration_seconds_bucket", "model") == set(MODELS)
    assert label_values(text, "gateway_client_saved_usd_total", "client") == set(CLIENTS)
    # Spend over budget: 0 for every client (without a budget too) and team, day and month.
    budgets = series(text, "gateway_client_budget_used_ratio")
    assert {(s["client"], s["period"]) for s in budgets} == {
        (client, period) for client in CLIENTS for period in ("day", "month")
    }
    teams = series(text, "gateway_team_budget_used_ratio")
    assert {(s["team"], s["period"]) for s in teams} == {("design", "day"), ("design", "month")}


def test_known_series_pair_only_upstreams_that_can_fail_over() -> None:
    failovers = series(started(), "gateway_upstream_failovers_total")
    pairs = {(s["from_upstream"], s["to_upstream"]) for s in failovers}
    assert pairs == {("default", "backup"), ("backup", "default")}
    upstream_models = {
        (s["upstream"], s["model"])
        for s in series(started(), "gateway_upstream_duration_seconds_count")
    }
    assert upstream_models == {(u, m) for u, models in SERVED.items() for m in models}


def test_known_series_leave_redis_out_without_redis() -> None:
    text = started(redis=False)
    assert series(text, "gateway_redis_errors_total") == []
    assert "gateway_redis_up" not in text  # absent, not "down", without Redis


def test_known_series_stay_within_configured_label_values() -> None:
    text = started()
    for name in ("gateway_client_requests_total", "gateway_client_images_total"):
        assert label_values(text, name, "client") == set(CLIENTS)
        assert label_values(text, name, "model") == set(MODELS)
    assert "other" not in label_values(text, "gateway_requests_total", "model")
    # Only clients that can send requests (and that the metrics know): never a new label value.
    text = started(clients=("design", "not-configured"))
    assert label_values(text, "gateway_client_refusals_total", "client") == {"design"}
