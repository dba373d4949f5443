"""Acceptance: real traffic through the gateway shows up in /metrics with the right values, and
no secret (upstream key, client key) nor any prompt text ever appears in the scrape."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.constants import CLIENT_KEY, UPSTREAM_KEYS
from tests.support.gateway_env import gateway_settings
from tests.support.prom import label_values, total
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, serve_in_thread

EDITS = "/v1/images/edits"
PROMPT = "paint the fence in zebra stripes, secret-prompt-marker-7f3a"
THIRD_KEY = "sk-test-upstream-CCCC3333cccc"


@pytest.fixture
def own_gateway(upstream: FakeOpenAIUpstream) -> Iterator[str]:
    """A gateway of this test's own, so its counters start at zero."""
    with serve_in_thread(create_app(gateway_settings(upstream.url))) as url:
        yield url


def scrape(url: str, key: str = CLIENT_KEY) -> str:
    response = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def test_metrics_after_real_traffic(upstream: FakeOpenAIUpstream, redis_url: str) -> None:
    # Three keys: one that answered 429 cools, one that answered 401 is disabled, one serves.
    settings = gateway_settings(
        upstream.url,
        GATEWAY_CACHE_ENABLED="true",
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_UPSTREAM_KEYS=",".join((*UPSTREAM_KEYS, THIRD_KEY)),
    )
    # Prompts unique to this run, so the shared test Redis holds no entry for them yet.
    run = uuid.uuid4().hex

    def prompt(n: int) -> str:
        return f"{PROMPT} {run} {n}"

    png = images.png(64, 64)
    image = ("a.png", png, "image/png")
    with serve_in_thread(create_app(settings)) as url:
        client = sdk_client(url)
        # Two successes paid upstream (1 + 2 images), then the first again from the cache.
        client.images.edit(image=image, prompt=prompt(1))
        client.images.edit(image=image, prompt=prompt(2), n=2)
        hit = client.images.with_raw_response.edit(image=image, prompt=prompt(1))
        assert hit.headers["x-cache"] == "hit"
        # Three validation errors, refused before any upstream call.
        with pytest.raises(openai.BadRequestError):
            client.images.edit(image=image, prompt=prompt(9), size="999x999")  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            client.images.edit(
                image=[image, ("b.gif", images.other_format("gif"), "image/gif")], prompt=prompt(9)
            )
        with pytest.raises(openai.NotFoundError):
            client.images.edit(image=image, prompt=prompt(9), model="no-such-model")
        # Upstream failures: 429, 401 (our key rejected, its text echoed back), 500.
        upstream.enqueue(
            Reply(429, {"error": {"message": "slow down"}}, headers={"retry-after": "7"}),
            Reply(401, {"error": {"message": f"Incorrect API key provided: {UPSTREAM_KEYS[0]}"}}),
            Reply(500, {"error": {"message": f"boom {UPSTREAM_KEYS[1]}"}}),
        )
        with pytest.raises(openai.RateLimitError):
            client.images.edit(image=image, prompt=prompt(3))
        with pytest.raises(openai.InternalServerError):
            client.images.edit(image=image, prompt=prompt(4))
        with pytest.raises(openai.InternalServerError):
            client.images.edit(image=image, prompt=prompt(5))
        assert len(upstream.edits) == 5
        text = scrape(url)

    model = "gpt-image-1.5"
    assert total(text, "gateway_requests_total", route=EDITS, model=model, status_class="2xx") == 3
    # 429 from upstream, size error and gif error are 4xx for a known model; the unknown model
    # is 4xx with no model label.
    assert total(text, "gateway_requests_total", route=EDITS, model=model, status_class="4xx") == 3
    assert total(text, "gateway_requests_total", route=EDITS, model="none", status_class="4xx") == 1
    assert total(text, "gateway_requests_total", route=EDITS, model=model, status_class="5xx") == 2
    assert total(text, "gateway_request_duration_seconds_count", route=EDITS) == 9
    assert total(text, "gateway_images_returned_total", model=model) == 4
    assert total(text, "gateway_requests_in_flight") == 0  # the scrape itself is not counted

    assert total(text, "gateway_validation_rejections_total", param="size") == 1
    assert total(text, "gateway_validation_rejections_total", param="image") == 1
    assert total(text, "gateway_validation_rejections_total", param="model") == 1
    assert total(text, "gateway_validation_rejections_total") == 3  # upstream errors are not

    assert total(text, "gateway_upstream_requests_total", upstream="default", outcome="ok") == 2
    assert total(text, "gateway_upstream_requests_total", upstream="default") == 5
    errors = "gateway_upstream_errors_total"
    assert total(text, errors, upstream="default", kind="rate_limited") == 1
    assert total(text, errors, upstream="default", kind="auth") == 1
    assert total(text, errors, upstream="default", kind="server") == 1
    assert total(text, "gateway_upstream_duration_seconds_count", model=model) == 5

    assert total(text, "gateway_cache_lookups_total", model=model, result="hit") == 1
    assert total(text, "gateway_cache_lookups_total", model=model, result="miss") == 2
    assert total(text, "gateway_cache_stores_total", model=model) == 2
    assert total(text, "gateway_cache_stored_bytes_total", model=model) > 0
    assert total(text, "gateway_cache_served_bytes_total", model=model) > 0
    assert total(text, "gateway_redis_up") == 1
    assert total(text, "gateway_redis_errors_total") == 0

    uploads = total(text, "gateway_upload_bytes_total")
    assert uploads >= 8 * len(png)  # every parsed form's files, accepted or refused
    assert total(text, "gateway_request_bytes_total", route=EDITS) > uploads  # plus the framing
    assert total(text, "gateway_response_bytes_total", route=EDITS) > 0

    keys = {"default#1", "default#2", "default#3"}
    assert label_values(text, "gateway_upstream_key_state", "key") == keys
    # Least recently used first: #1 and #2 served, #3 got the 429, #1 the 401, #2 the 500.
    assert total(text, "gateway_upstream_key_state", key="default#3", state="cooling") == 1
    assert total(text, "gateway_upstream_key_state", key="default#1", state="disabled") == 1
    assert total(text, "gateway_upstream_key_state", key="default#2", state="healthy") == 1

    for secret in (
        *UPSTREAM_KEYS,
        THIRD_KEY,
        CLIENT_KEY,
        "secret-prompt-marker",
        "no-such-model",
        run,
    ):
        assert secret not in text


def test_metrics_count_unreachable_upstream_as_connect(upstream: FakeOpenAIUpstream) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    with serve_in_thread(create_app(gateway_settings(closed))) as url:
        with pytest.raises(openai.InternalServerError):
            sdk_client(url).images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
        text = scrape(url)
    assert total(text, "gateway_upstream_errors_total", kind="connect") == 1


def test_metrics_need_a_client_key_by_default(own_gateway: str) -> None:
    assert httpx.get(own_gateway + "/metrics").status_code == 401
    assert (
        httpx.get(own_gateway + "/metrics", headers={"authorization": "Bearer nope"}).status_code
        == 401
    )
    assert "gateway_requests_total" in scrape(own_gateway)


def test_metrics_token_replaces_client_keys_for_metrics(upstream: FakeOpenAIUpstream) -> None:
    token = "metrics-token-0123456789abcdef"
    settings = gateway_settings(upstream.url, GATEWAY_METRICS_TOKEN=token)
    with serve_in_thread(create_app(settings)) as url:
        assert httpx.get(url + "/metrics").status_code == 401
        refused = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert "gateway_requests_total" in scrape(url, key=token)
        # The token opens /metrics only.
        assert (
            httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {token}"}).status_code
            == 401
        )


def test_metrics_public_needs_no_credentials(upstream: FakeOpenAIUpstream) -> None:
    settings = gateway_settings(upstream.url, GATEWAY_METRICS_PUBLIC="true")
    with serve_in_thread(create_app(settings)) as url:
        response = httpx.get(url + "/metrics")
        assert response.status_code == 200
        assert "gateway_requests_total" in response.text
        assert httpx.get(url + "/v1/models").status_code == 401  # nothing else opens up


def test_metrics_report_redis_up_and_errors(upstream: FakeOpenAIUpstream, redis_url: str) -> None:
    settings = gateway_settings(upstream.url, GATEWAY_REDIS_URL=redis_url)
    with serve_in_thread(create_app(settings)) as url:
        assert httpx.get(url + "/readyz").status_code == 200
        text = scrape(url)
    assert total(text, "gateway_redis_up") == 1
    assert total(text, "gateway_redis_errors_total") == 0

    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    settings = gateway_settings(upstream.url, GATEWAY_REDIS_URL=nowhere)
    with serve_in_thread(create_app(settings)) as url:
        # A down Redis degrades the gateway (served uncached), it does not take it out.
        assert httpx.get(url + "/readyz").json()["checks"]["redis"] == "unreachable"
        text = scrape(url)
    assert total(text, "gateway_redis_up") == 0
    assert total(text, "gateway_redis_errors_total", component="health") >= 1
    assert "127.0.0.1:" not in text  # the Redis URL (it may hold a password) is no label
