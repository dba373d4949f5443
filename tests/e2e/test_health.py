"""/healthz says the process is alive; /readyz checks dependencies and says which one failed."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.constants import UPSTREAM_KEYS
from tests.support.gateway_env import gateway_env
from tests.support.servers import free_port, serve_in_thread


def test_health_readyz_reports_redis(fake_upstream: FakeOpenAIUpstream, redis_url: str) -> None:
    env = gateway_env(fake_upstream.url, GATEWAY_REDIS_URL=redis_url)
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["redis"] == "ok"


def test_health_readyz_reports_unreachable_redis_as_a_degraded_cache(
    fake_upstream: FakeOpenAIUpstream,
) -> None:
    # Redis only backs the cache, which fails open: the gateway still serves, uncached.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = gateway_env(fake_upstream.url, GATEWAY_REDIS_URL=dead)
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["cache"] == "degraded"
        assert ready.json()["checks"]["redis"].startswith("unreachable")
        assert dead not in ready.text


def test_health_readyz_says_when_no_upstream_key_is_usable(
    client: OpenAI, gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    ready = httpx.get(gateway_url + "/readyz").json()
    assert ready["status"] == "ready"
    assert ready["checks"]["upstream:default"] == "ok"
    assert ready["keys"] == {"default": {"healthy": 2}}
    # Both keys answer 429 with a minute to wait: nothing can be served until one is back.
    slow_down = {"error": {"message": "slow down"}}
    upstream.enqueue(*(Reply(status=429, body=slow_down, headers={"retry-after": "60"}),) * 2)
    for _ in range(2):
        with pytest.raises(openai.RateLimitError):
            client.images.edit(image=("a.png", images.png()), prompt="x")
    response = httpx.get(gateway_url + "/readyz")
    # Still in rotation: every replica shares these keys, so leaving would not help.
    assert response.status_code == 200
    ready = response.json()
    assert ready["status"] == "degraded"
    assert ready["checks"]["upstream:default"] == "no usable key (2 cooling)"
    assert ready["keys"] == {"default": {"cooling": 2}}
    assert all(key not in response.text for key in UPSTREAM_KEYS)
