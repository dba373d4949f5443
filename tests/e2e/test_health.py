"""/healthz says the process is alive; /readyz checks dependencies and says which one failed."""

from __future__ import annotations

import httpx

from app.config import load_settings
from app.main import create_app
from tests.conftest import gateway_env
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support.servers import free_port, serve_in_thread


def test_health_readyz_reports_redis(fake_upstream: FakeOpenAIUpstream, redis_url: str) -> None:
    env = gateway_env(fake_upstream.url, GATEWAY_REDIS_URL=redis_url)  # type: ignore[attr-defined]
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["checks"]["redis"] == "ok"


def test_health_readyz_reports_unreachable_redis_as_a_degraded_cache(
    fake_upstream: FakeOpenAIUpstream,
) -> None:
    # Redis only backs the cache, which fails open: the gateway still serves, uncached.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    env = gateway_env(fake_upstream.url, GATEWAY_REDIS_URL=dead)  # type: ignore[attr-defined]
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        assert httpx.get(url + "/healthz").status_code == 200
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "degraded"
        assert ready.json()["checks"]["cache"] == "degraded"
        assert ready.json()["checks"]["redis"].startswith("unreachable")
        assert dead not in ready.text
