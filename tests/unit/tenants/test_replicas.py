"""Acceptance for clients (issue 9): two `image-gateway serve` processes sharing one real Redis.

Runtime keys, per-client limits and quotas, model permissions and usage accounting must hold
whichever replica a request lands on.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import openai
import pytest

from app.config.catalog import ModelPrice
from app.config.settings import load_settings
from tests.e2e.test_demo_cli import cli
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images, prom
from tests.support.constants import REPO, UPSTREAM_KEYS
from tests.support.gateway_config import write_gateway_config
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, wait_for_port

ADMIN_KEY = "igw-admin-" + secrets.token_hex(16)
PNG = images.png(64, 64)
KEYS = {
    "limited": "igw-limited-" + secrets.token_hex(16),
    "neighbour": "igw-neighbour-" + secrets.token_hex(16),
    "quota": "igw-quota-" + secrets.token_hex(16),
    "flux-only": "igw-flux-" + secrets.token_hex(16),
    "accounted": "igw-accounted-" + secrets.token_hex(16),
    "refund": "igw-refund-" + secrets.token_hex(16),
}
ENV_NAMES = {name: "GW_TEST_KEYS_" + name.upper().replace("-", "_") for name in KEYS}
NAMED_CLIENTS = {
    "rotating": {},  # keys only from the admin API
    "limited": {"limits": {"requests_per_minute": 5}},
    "neighbour": {"limits": {"requests_per_minute": 5}},
    "quota": {"limits": {"images_per_day": 10}},
    "flux-only": {"models": ["flux-kontext-pro"]},
    "accounted": {},
    "refund": {"limits": {"images_per_day": 2}},
}


@dataclass
class Replicas:
    a: str
    b: str
    env: dict[str, str]

    @property
    def both(self) -> tuple[str, str]:
        return self.a, self.b


def admin(method: str, url: str, path: str, **kwargs: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    return httpx.request(method, url + path, headers=headers, timeout=10, **kwargs)  # type: ignore[arg-type]


def edit(url: str, key: str, prompt: str | None = None, **kwargs: object) -> object:
    # A fresh prompt unless one is given: the result cache is on, and only the usage test
    # wants hits.
    return sdk_client(url, key=key).images.edit(
        image=("a.png", PNG, "image/png"),
        prompt=prompt or "edit " + secrets.token_hex(8),
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def replicas(
    fake_upstream: FakeOpenAIUpstream,
    clients_redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Replicas]:
    clients = {
        # A fresh namespace: state left in a shared test Redis by earlier runs cannot leak in.
        "namespace": "test-" + secrets.token_hex(4),
        "named": {
            name: {**body, **({"keys_env": ENV_NAMES[name]} if name in KEYS else {})}
            for name, body in NAMED_CLIENTS.items()
        },
    }
    config = write_gateway_config(
        tmp_path_factory.mktemp("replicas"),
        clients=clients,
        redis_url=clients_redis_url,
        # One upstream attempt per request, so a scripted failure is what the client sees; and
        # key health of these replicas' own.
        retry={"max_attempts": 1},
        pool={"namespace": clients["namespace"]},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(
        GATEWAY_CONFIG=str(config),
        GATEWAY_UPSTREAM_URL=fake_upstream.url,
        GATEWAY_UPSTREAM_KEYS=",".join(UPSTREAM_KEYS),
        GATEWAY_ADMIN_KEYS=ADMIN_KEY,
        **{ENV_NAMES[name]: key for name, key in KEYS.items()},
    )
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [*cli(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_for_port(port, timeout=30)
        yield Replicas(*(f"http://127.0.0.1:{port}" for port in ports), env=env)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


def test_clients_runtime_key_works_on_other_replica_and_revocation_reaches_both(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    created = admin("POST", replicas.a, "/admin/clients/rotating/keys", json={"label": "ci"})
    assert created.status_code == 201, created.text
    body = created.json()
    key = body["key"]
    assert key.startswith("igw-") and body["client"] == "rotating" and body["label"] == "ci"

    # At once on the other replica: no restart, no wait.
    assert len(edit(replicas.b, key).data) == 1  # type: ignore[attr-defined]
    assert len(edit(replicas.a, key).data) == 1  # type: ignore[attr-defined]

    listed = admin("GET", replicas.b, "/admin/clients/rotating/keys").json()["data"]
    assert [item["id"] for item in listed] == [body["id"]]
    assert key not in str(listed)  # the key is shown once, at creation, never again

    revoked = admin("DELETE", replicas.b, f"/admin/clients/rotating/keys/{body['id']}")
    assert revoked.status_code == 200 and revoked.json()["revoked"] is True
    # The replica that revoked refuses it at once; the other re-reads the key version at
    # least every 250 ms, so one second later it must refuse it too.
    with pytest.raises(openai.AuthenticationError):
        edit(replicas.b, key)
    time.sleep(1.0)
    for url in replicas.both:
        with pytest.raises(openai.AuthenticationError) as caught:
            edit(url, key)
        assert caught.value.status_code == 401
    assert len(upstream.edits) == 2
    again = admin("DELETE", replicas.a, f"/admin/clients/rotating/keys/{body['id']}")
    assert again.status_code == 404


def test_clients_requests_per_minute_hold_across_replicas(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    key = KEYS["limited"]
    remaining = []
    for number in range(5):
        raw = sdk_client(replicas.both[number % 2], key=key).images.with_raw_response.edit(
            image=("a.png", PNG, "image/png"), prompt="rpm " + secrets.token_hex(8)
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "5"
        assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(raw.headers["x-ratelimit-remaining-requests"]))
    assert remaining == [4, 3, 2, 1, 0]  # one count across both replicas
    for url in replicas.both:
        with pytest.raises(openai.RateLimitError) as caught:
            edit(url, key)
        error = caught.value
        assert error.status_code == 429
        assert error.code == "rate_limit_exceeded"
        assert "requests per minute" in error.message and "requests_per_minute" in error.message
        retry_after = int(error.response.headers["retry-after"])
        assert 1 <= retry_after <= 60
        assert int(error.response.headers["retry-after-ms"]) <= 60_000
    assert len(upstream.edits) == 5
    # Another client with the same limit is unaffected.
    for number in range(5):
        edit(replicas.both[number % 2], KEYS["neighbour"])
    assert len(upstream.edits) == 10


def test_clients_daily_image_quota_is_insufficient_quota(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    key = KEYS["quota"]
    edit(replicas.a, key, n=4)
    edit(replicas.b, key, n=4)
    with pytest.raises(openai.RateLimitError) as caught:
        edit(replicas.a, key, n=4)
    error = caught.value
    assert error.status_code == 429
    assert error.code == "insufficient_quota"
    assert error.type == "insufficient_quota"
    assert "8 of its 10 images this day" in error.message
    assert error.response.headers["x-should-retry"] == "false"
    assert len(upstream.edits) == 2
    # What is left of the quota can still be used.
    assert len(edit(replicas.b, key, n=2).data) == 2  # type: ignore[attr-defined]
    shown = admin("GET", replicas.a, "/admin/clients/quota").json()
    assert shown["limits"]["images_per_day"] == 10
    assert shown["quota_used"]["images_today"] == 10


def test_clients_quota_is_given_back_when_the_upstream_fails(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    key = KEYS["refund"]
    upstream.enqueue(Reply(status=500, body={"error": {"message": "boom"}}))
    with pytest.raises(openai.InternalServerError):
        edit(replicas.a, key, n=2)
    # No image was made, so the whole daily quota of 2 is still there.
    assert len(edit(replicas.b, key, n=2).data) == 2  # type: ignore[attr-defined]
    with pytest.raises(openai.RateLimitError) as caught:
        edit(replicas.a, key, n=1)
    assert caught.value.code == "insufficient_quota"
    assert len(upstream.edits) == 2


def test_clients_model_not_allowed_is_permission_denied(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    key = KEYS["flux-only"]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        edit(replicas.a, key, model="gpt-image-1")
    assert caught.value.status_code == 403
    assert caught.value.body["param"] == "model"  # type: ignore[index]
    assert "gpt-image-1" in caught.value.message
    assert upstream.edits == []
    assert len(edit(replicas.b, key, model="flux-kontext-pro").data) == 1  # type: ignore[attr-defined]
    listed = {model.id for model in sdk_client(replicas.a, key=key).models.list().data}
    assert listed == {"flux-kontext-pro"}


def test_clients_usage_reports_a_mixed_run_exactly(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    key = KEYS["accounted"]
    wide, flux_prompt = "wide " + secrets.token_hex(8), "flux " + secrets.token_hex(8)
    edit(replicas.a, key, model="gpt-image-1")
    edit(replicas.b, key, wide, model="gpt-image-1", n=2)
    edit(replicas.b, key, flux_prompt, model="flux-kontext-pro", n=3)
    # The same edits again, on the other replica: answered from the shared cache.
    edit(replicas.a, key, wide, model="gpt-image-1", n=2)
    edit(replicas.a, key, flux_prompt, model="flux-kontext-pro", n=3)
    upstream.enqueue(Reply(status=500, body={"error": {"message": "upstream broke"}}))
    with pytest.raises(openai.InternalServerError):
        edit(replicas.a, key, model="gpt-image-1")
    with pytest.raises(openai.BadRequestError):
        edit(replicas.a, key, model="gpt-image-1", n=11)  # refused by validation: not counted
    assert len(upstream.edits) == 4

    today = datetime.now(UTC).date()
    query = {"client": "accounted", "from": (today - timedelta(days=1)).isoformat()}
    report = admin("GET", replicas.b, "/admin/usage", params=query)
    assert report.status_code == 200, report.text
    per_model: dict[str, dict[str, float]] = {}
    for row in report.json()["data"]:
        assert row["client"] == "accounted"
        totals = per_model.setdefault(row["model"], {})
        for name, value in row.items():
            if isinstance(value, int | float):
                totals[name] = totals.get(name, 0) + value

    catalog = load_settings(env=replicas.env).catalog
    gpt, flux = catalog.models["gpt-image-1"].price, catalog.models["flux-kontext-pro"].price

    def cost(price: ModelPrice, images: int) -> Decimal:
        # The fake upstream reports 50 input and 100 output tokens per answer.
        return (
            price.per_image * images
            + price.per_million_input_tokens * 50 / 1_000_000
            + price.per_million_output_tokens * 100 / 1_000_000
        )

    gpt_cost = cost(gpt, 1) + cost(gpt, 2)
    flux_cost = cost(flux, 3)
    assert gpt_cost > 0 and flux_cost > 0
    assert per_model["gpt-image-1"] == {
        "requests": 3,
        "images": 3,
        "errors": 1,
        "cache_hits": 1,
        "cached_images": 2,
        "upstream_calls_saved": 1,
        "input_bytes": 4 * len(PNG),
        "input_tokens": 100,
        "output_tokens": 200,
        "total_tokens": 300,
        "cost_usd": float(gpt_cost),
        # The hit's answer reported 50 tokens in, 100 out: saved, not used.
        "saved_input_tokens": 50,
        "saved_output_tokens": 100,
        "saved_usd": float(cost(gpt, 2)),
    }
    assert per_model["flux-kontext-pro"] == {
        "requests": 2,
        "images": 3,
        "errors": 0,
        "cache_hits": 1,
        "cached_images": 3,
        "upstream_calls_saved": 1,
        "input_bytes": 2 * len(PNG),
        "input_tokens": 50,
        "output_tokens": 100,
        "total_tokens": 150,
        "cost_usd": float(flux_cost),
        "saved_input_tokens": 50,
        "saved_output_tokens": 100,
        "saved_usd": float(flux_cost),
    }
    totals = report.json()["totals"]
    assert (totals["requests"], totals["images"], totals["cache_hits"]) == (5, 6, 2)
    assert Decimal(str(totals["cost_usd"])) == gpt_cost + flux_cost

    # The same run in the client-labelled counters, summed over both replicas' scrapes.
    scrapes = [
        httpx.get(url + "/metrics", headers={"authorization": f"Bearer {key}"}).text
        for url in replicas.both
    ]

    def counted(name: str, **labels: str) -> float:
        return sum(prom.total(text, name, client="accounted", **labels) for text in scrapes)

    assert counted("gateway_client_requests_total", model="gpt-image-1", outcome="ok") == 2
    assert counted("gateway_client_requests_total", model="gpt-image-1", outcome="error") == 1
    assert counted("gateway_client_requests_total", outcome="cache_hit") == 2
    assert counted("gateway_client_images_total", model="flux-kontext-pro", source="cache") == 3
    assert counted("gateway_client_cost_usd_total") == pytest.approx(float(gpt_cost + flux_cost))
    # Labels name configured clients only, never a key or anything a client sent.
    for text in scrapes:
        assert prom.label_values(text, "gateway_client_requests_total", "client") <= set(
            NAMED_CLIENTS
        )
        assert key not in text


def test_clients_admin_usage_rejects_bad_queries(replicas: Replicas) -> None:
    for params, param in [
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"from": "2026-11-02", "to": "2026-11-01"}, "from"),
        ({"from": "2020-01-01", "to": "2026-01-01"}, "from"),
        ({"client": "../etc"}, "client"),
    ]:
        response = admin("GET", replicas.a, "/admin/usage", params=params)
        assert response.status_code == 400, params
        assert response.json()["error"]["param"] == param


def test_clients_admin_keys_for_unknown_client_is_404(replicas: Replicas) -> None:
    response = admin("POST", replicas.a, "/admin/clients/nobody/keys")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    as_client = httpx.post(
        replicas.a + "/admin/clients/rotating/keys",
        headers={"authorization": f"Bearer {KEYS['accounted']}"},
    )
    assert as_client.status_code == 401  # client keys never open the admin API
