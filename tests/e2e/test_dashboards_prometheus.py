"""Acceptance: against a real Prometheus scraping a gateway that has served traffic with no
faults, every panel query of the shipped dashboards and every quantity an alert watches returns a
series (0 allowed, never NaN): operators tell "nothing happened" from "not measured".

The gateway runs the shipped config/gateway.yaml and catalog (one upstream, two keys, the cache
on, Redis) as a real process; its upstream is the fake on loopback. Prometheus scrapes it every
second and loads the shipped alert rules. Grafana's variables get windows that hold the whole
test, as a dashboard over the last few minutes would.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import CLIENT_KEY, CONFIG, UPSTREAM_KEYS
from tests.support.dashboards import ALERTS, alert_rules, dashboard_targets, watched_quantities
from tests.support.gateway_process import gateway_process
from tests.support.prometheus_server import JOB, running_prometheus
from tests.support.sdk import sdk_client

# Wider than the test lasts, so a slow machine cannot push the traffic out of the window.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1s", "$__range": "15m"}
EDITS = 3  # answered edits (two paid upstream, one from the cache) and one generation


def test_every_dashboard_panel_and_alert_reads_a_series_after_clean_traffic(
    tmp_path: Path, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    env = {
        "GATEWAY_CONFIG": str(CONFIG),
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        "GATEWAY_REDIS_URL": redis_url,
        "GATEWAY_METRICS_PUBLIC": "true",
        "GATEWAY_CACHE_ENABLED": "true",
        "GATEWAY_POOL_NAMESPACE": "t-" + uuid.uuid4().hex[:12],
    }
    with (
        gateway_process(env, tmp_path / "gateway.log") as gateway,
        running_prometheus([gateway.url.removeprefix("http://")], (ALERTS,)) as prometheus,
    ):
        # Scraped at least twice before any traffic: every rate() below has a 0 to rise from.
        up = f'up{{job="{JOB}"}}'
        prometheus.wait_until(f"sum_over_time({up}[1m])", lambda seen: seen >= 2)

        client = sdk_client(gateway.url)
        run = uuid.uuid4().hex  # prompts of this run only: the shared Redis has no entry yet
        png = ("in.png", images.png(32, 32), "image/png")
        client.images.edit(image=png, prompt=f"first {run}")
        client.images.edit(image=png, prompt=f"second {run}", n=2)
        hit = client.images.with_raw_response.edit(image=png, prompt=f"first {run}")
        assert hit.headers["x-cache"] == "hit"
        client.images.generate(prompt=f"a generation {run}")

        # Until Prometheus has scraped the gateway after the traffic.
        prometheus.wait_until(
            "sum(gateway_client_requests_total)", lambda count: count == EDITS + 1
        )

        empty, not_a_number = [], []
        queries = [
            *dashboard_targets(GRAFANA_VARIABLES),
            *(
                (f"{ALERTS.name}: {name}", quantity)
                for name, expr in alert_rules()
                for quantity in watched_quantities(expr)
            ),
        ]
        for where, expr in queries:
            result = prometheus.query(expr)
            if not result:
                empty.append(f"{where}: {expr}")
            elif any(math.isnan(float(series["value"][1])) for series in result):
                not_a_number.append(f"{where}: {expr} -> {result}")
        assert not empty, "no series:\n" + "\n".join(empty)
        assert not not_a_number, "NaN:\n" + "\n".join(not_a_number)

        # The rules load and evaluate cleanly, and none fires after clean traffic.
        rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
        assert {rule["name"] for rule in rules} == {name for name, _ in alert_rules()}
        assert all(rule["health"] != "err" for rule in rules), rules
        assert prometheus.api("alerts")["alerts"] == []
