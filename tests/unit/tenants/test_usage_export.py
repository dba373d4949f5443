"""GET /admin/usage/export over a real port and a real Redis: one row per client, UTC day and
model with every counter of Usage (columns derived from it), CSV or JSON lines, the same range
rules as /admin/usage, and 400s in OpenAI's envelope for bad queries."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from app.config.settings import load_settings
from app.main import create_app
from app.tenants.export import COLUMNS
from app.tenants.usage import COUNTERS, SHOWN_COUNTERS, Usage, UsageLedger
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support.constants import CLIENT_KEY, UPSTREAM_KEYS
from tests.support.gateway_config import write_gateway_config
from tests.support.servers import serve_in_thread
from tests.unit.tenants.conftest import redis_client

ADMIN = {"authorization": "Bearer igw-admin-" + secrets.token_hex(8)}
TODAY = datetime.now(UTC).date()
EARLIER = TODAY - timedelta(days=2)


@dataclass
class Exporter:
    url: str
    namespace: str


def record(
    redis_url: str, namespace: str, client: str, day: date, model: str, usage: Usage
) -> None:
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()

    async def run() -> None:
        redis = redis_client(redis_url)
        try:
            await UsageLedger(redis, namespace=namespace, clock=lambda: noon).record(
                client, model, usage
            )
        finally:
            await redis.aclose()

    asyncio.run(run())


@pytest.fixture(scope="module")
def exporter(
    fake_upstream: FakeOpenAIUpstream,
    clients_redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Exporter]:
    namespace = "exp-" + secrets.token_hex(4)
    config = write_gateway_config(
        Path(tmp_path_factory.mktemp("export")),
        redis_url=clients_redis_url,
        clients={"namespace": namespace, "named": {"ops": {}, "art": {}}},
    )
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_UPSTREAM_URL": fake_upstream.url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        "GATEWAY_ADMIN_KEYS": ADMIN["authorization"].removeprefix("Bearer "),
    }
    for client, day, model, usage in (
        ("ops", EARLIER, "gpt-image-1.5", Usage(requests=3, images=3, cost_nano_usd=1)),
        ("ops", EARLIER, "flux-kontext-pro", Usage(requests=1, images=1, errors=1)),
        ("art", EARLIER, "gpt-image-1.5", Usage(requests=1, cache_hits=1, saved_nano_usd=7)),
        ("art", TODAY, "gpt-image-1.5", Usage(requests=2, images=4, cost_nano_usd=40_000_000)),
    ):
        record(clients_redis_url, namespace, client, day, model, usage)
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        yield Exporter(url, namespace)


def export(exporter: Exporter, **params: str) -> httpx.Response:
    return httpx.get(exporter.url + "/admin/usage/export", params=params, headers=ADMIN)


def test_usage_export_columns_follow_the_usage_counters() -> None:
    # A counter added to Usage (a budget's, say) is exported without touching the export.
    assert ("client", "date", "model", *SHOWN_COUNTERS) == COLUMNS
    for counter in COUNTERS:
        shown = counter.replace("_nano_usd", "_usd")
        assert shown in SHOWN_COUNTERS, counter
    assert len(SHOWN_COUNTERS) == len(COUNTERS)


def test_usage_export_csv_lists_each_client_day_and_model(exporter: Exporter) -> None:
    response = export(exporter, **{"from": EARLIER.isoformat(), "to": TODAY.isoformat()})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == (
        f"attachment; filename=usage-{EARLIER.isoformat()}-{TODAY.isoformat()}.csv"
    )
    assert response.text.startswith(",".join(COLUMNS) + "\r\n")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    # By day, then client, then model.
    assert [(r["date"], r["client"], r["model"]) for r in rows] == [
        (EARLIER.isoformat(), "art", "gpt-image-1.5"),
        (EARLIER.isoformat(), "ops", "flux-kontext-pro"),
        (EARLIER.isoformat(), "ops", "gpt-image-1.5"),
        (TODAY.isoformat(), "art", "gpt-image-1.5"),
    ]
    assert rows[0]["saved_usd"] == "0.000000007" and rows[0]["cache_hits"] == "1"
    assert rows[2]["cost_usd"] == "0.000000001"  # exact, never 1e-09
    assert rows[3]["images"] == "4" and rows[3]["cost_usd"] == "0.040000000"
    assert rows[1]["errors"] == "1" and rows[1]["input_tokens"] == "0"


def test_usage_export_jsonl_matches_the_report_rows(exporter: Exporter) -> None:
    span = {"from": EARLIER.isoformat(), "to": TODAY.isoformat()}
    response = export(exporter, **span, format="jsonl", client="ops")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["content-disposition"].endswith(".jsonl")
    rows = [json.loads(line) for line in response.text.splitlines()]
    report = httpx.get(
        exporter.url + "/admin/usage", params={**span, "client": "ops"}, headers=ADMIN
    ).json()
    assert rows == sorted(report["data"], key=lambda row: (row["date"], row["model"]))
    assert {row["client"] for row in rows} == {"ops"}
    assert list(rows[0]) == list(COLUMNS)


def test_usage_export_defaults_to_today(exporter: Exporter) -> None:
    rows = list(csv.DictReader(io.StringIO(export(exporter).text)))
    assert [(r["date"], r["client"]) for r in rows] == [(TODAY.isoformat(), "art")]


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"format": "xml"}, "format", "invalid_format"),
        ({"from": "2026-13-01"}, "from", "invalid_date"),
        ({"to": "yesterday"}, "to", "invalid_date"),
        ({"from": TODAY.isoformat(), "to": EARLIER.isoformat()}, "from", "invalid_date_range"),
        (
            {"from": (TODAY - timedelta(days=366)).isoformat(), "to": TODAY.isoformat()},
            "from",
            "invalid_date_range",
        ),
        ({"client": "Not A Name"}, "client", "invalid_client"),
    ],
)
def test_usage_export_refuses_bad_queries(
    exporter: Exporter, params: dict[str, str], param: str, code: str
) -> None:
    response = export(exporter, **params)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_usage_export_needs_an_admin_key(exporter: Exporter) -> None:
    as_client = httpx.get(
        exporter.url + "/admin/usage/export", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert as_client.status_code in (401, 403)
    assert httpx.get(exporter.url + "/admin/usage/export").status_code == 401
