"""Acceptance (issue 19): spend budgets and what a cache hit costs, through the real OpenAI SDK
against two gateway replicas sharing one real Redis.

- A client with a daily budget of $0.10 edits with a model priced $0.04 an image: two edits pass,
  the third is a 429 `insufficient_quota` that never reaches the upstream, whichever replica
  each edit lands on.
- A cache hit's `usage` reports zero tokens in OpenAI's shape, and what it saved shows in
  /admin/usage and /metrics.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime

import httpx
import openai
import pytest

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images, prom
from tests.support.constants import UPSTREAM_KEYS
from tests.support.gateway_config import write_gateway_config
from tests.support.redis_topologies import with_db
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread
from tests.unit.tenants.conftest import CLIENTS_DB

ADMIN_KEY = "igw-admin-" + secrets.token_hex(16)
BUDGETED_KEY = "igw-budgeted-" + secrets.token_hex(16)
SAVER_KEY = "igw-saver-" + secrets.token_hex(16)
PNG = ("in.png", images.png(32, 32), "image/png")
# $0.04 an image in the shipped catalog; no token rates, so worst case and cost are the same.
MODEL = "flux-kontext-pro"


@dataclass
class Replicas:
    a: str
    b: str


@pytest.fixture(scope="module")
def replicas(
    fake_upstream: FakeOpenAIUpstream, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    namespace = "t-" + uuid.uuid4().hex[:12]
    config = write_gateway_config(
        tmp_path_factory.mktemp("budgets"),
        # The tenants' database: suites that scan database 0 must not see these keys.
        redis_url=with_db(redis_url, CLIENTS_DB),
        retry={"max_attempts": 1},
        pool={"namespace": namespace},
        clients={
            "namespace": namespace,
            "named": {
                "team-a": {
                    "keys_env": "GW_TEST_KEYS_TEAM_A",
                    "limits": {"budget_usd_per_day": 0.10},
                },
                "saver": {"keys_env": "GW_TEST_KEYS_SAVER"},
            },
        },
    )
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_UPSTREAM_URL": fake_upstream.url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_ADMIN_KEYS": ADMIN_KEY,
        "GW_TEST_KEYS_TEAM_A": BUDGETED_KEY,
        "GW_TEST_KEYS_SAVER": SAVER_KEY,
    }
    with ExitStack() as stack:
        # Two replicas: two apps, each with its own Redis clients, on one Redis.
        urls = [
            stack.enter_context(serve_in_thread(create_app(load_settings(env=env))))
            for _ in range(2)
        ]
        yield Replicas(*urls)


def edit(url: str, key: str, prompt: str) -> openai.types.ImagesResponse:
    return sdk_client(url, key=key).images.edit(image=PNG, prompt=prompt, model=MODEL)


def metrics(url: str) -> str:
    response = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {SAVER_KEY}"})
    assert response.status_code == 200
    return response.text


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample with exactly these labels, or None when it is absent."""
    found = [value for n, got, value in prom.samples(text) if n == name and got == labels]
    return found[0] if found else None


def ratio(url: str, period: str) -> float | None:
    return sample(metrics(url), "gateway_client_budget_used_ratio", client="team-a", period=period)


def test_budget_third_edit_is_insufficient_quota_and_never_reaches_the_upstream(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    assert ratio(replicas.a, "day") == 0.0  # there from startup

    run = uuid.uuid4().hex  # fresh prompts: no cache hit may stand in for an edit
    assert len(edit(replicas.a, BUDGETED_KEY, f"one {run}").data or []) == 1
    assert len(edit(replicas.b, BUDGETED_KEY, f"two {run}").data or []) == 1
    assert len(upstream.edits) == 2

    for url in (replicas.a, replicas.b):
        with pytest.raises(openai.RateLimitError) as caught:
            edit(url, BUDGETED_KEY, f"three {run}")
        error = caught.value
        assert error.status_code == 429
        assert error.code == "insufficient_quota" and error.type == "insufficient_quota"
        assert "client 'team-a' is over its daily budget of $0.10" in error.message
        assert "spent $0.08" in error.message and "may cost up to $0.04" in error.message
        assert error.response.headers["x-should-retry"] == "false"
    assert len(upstream.edits) == 2  # the refused edits never reached it

    # Both replicas read the shared spend: 8 of 10 cents.
    for url in (replicas.a, replicas.b):
        assert ratio(url, "day") == pytest.approx(0.8)
        refusals = sample(
            metrics(url),
            "gateway_client_refusals_total",
            client="team-a",
            limit="budget_usd_per_day",
        )
        assert refusals == 1  # one refusal on each replica
    shown = httpx.get(
        replicas.b + "/admin/clients/team-a", headers={"authorization": f"Bearer {ADMIN_KEY}"}
    ).json()
    assert shown["limits"]["budget_usd_per_day"] == "0.1"
    assert shown["budgets"] == [
        {
            "owner": "client",
            "name": "team-a",
            "budget_usd_per_day": 0.1,
            "budget_usd_per_month": None,
            "spent_usd_today": 0.08,
            "spent_usd_this_month": 0.08,
        }
    ]


def test_cache_hit_usage_is_zero_and_counted_as_saved(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    client = sdk_client(replicas.a, key=SAVER_KEY)
    prompt = f"twice {uuid.uuid4().hex}"
    first = client.images.edit(image=PNG, prompt=prompt, model="gpt-image-1")
    raw = sdk_client(replicas.b, key=SAVER_KEY).images.with_raw_response.edit(
        image=PNG, prompt=prompt, model="gpt-image-1"
    )
    assert raw.headers["x-cache"] == "hit"
    second = raw.parse()
    assert len(upstream.edits) == 1
    assert first.usage is not None and first.usage.input_tokens == 50
    # The SDK parses the hit's usage: OpenAI's shape, every count 0.
    usage = second.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (0, 0, 0)
    details = usage.input_tokens_details
    assert (details.text_tokens, details.image_tokens) == (0, 0)
    assert second.data and second.data[0].b64_json == first.data[0].b64_json  # type: ignore[index]

    today = datetime.now(UTC).date().isoformat()
    report = httpx.get(
        replicas.a + "/admin/usage",
        params={"client": "saver"},
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    ).json()
    (row,) = [row for row in report["data"] if row["model"] == "gpt-image-1"]
    assert row["date"] == today
    assert (row["requests"], row["cache_hits"], row["input_tokens"]) == (2, 1, 50)
    assert (row["saved_input_tokens"], row["saved_output_tokens"]) == (50, 100)
    # gpt-image-1: $10 / M input tokens, $40 / M output tokens.
    assert row["saved_usd"] == pytest.approx(0.0045) and row["cost_usd"] == pytest.approx(0.0045)

    saved = sample(
        metrics(replicas.b), "gateway_client_saved_usd_total", client="saver", model="gpt-image-1"
    )
    assert saved == pytest.approx(0.0045)
    unsaved = sample(
        metrics(replicas.a), "gateway_client_saved_usd_total", client="saver", model=MODEL
    )
    assert unsaved == 0.0  # there from startup, at 0


def test_streaming_cache_hit_usage_is_zero(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    client = sdk_client(replicas.a, key=SAVER_KEY)
    prompt = f"streamed {uuid.uuid4().hex}"
    client.images.edit(image=PNG, prompt=prompt, model="gpt-image-1")
    stream = client.images.edit(image=PNG, prompt=prompt, model="gpt-image-1", stream=True)
    completed = [event for event in stream if event.type == "image_edit.completed"]
    assert len(upstream.edits) == 1  # the stream was a cache hit
    assert completed and all(event.usage.total_tokens == 0 for event in completed)
    assert all(event.usage.input_tokens_details.image_tokens == 0 for event in completed)
