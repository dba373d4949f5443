"""Shared fixtures: a fake upstream and the gateway on real loopback ports, the real OpenAI SDK
as the client, and a private Redis server."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from app.config.settings import Settings, load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support.log_watch import (  # noqa: F401 (an autouse fixture and a summary hook)
    no_traceback_from_client_input,
    pytest_terminal_summary,
)
from tests.support.redis_server import test_redis_url
from tests.support.servers import serve_in_thread

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "config" / "gateway.yaml"
SINGLE_ATTEMPT_CONFIG = REPO / "tests" / "support" / "single_attempt.yaml"
CLIENT_KEY = "igw-test-client-key-0123456789abcdef"
UPSTREAM_KEYS = ("sk-test-upstream-AAAA1111aaaa", "sk-test-upstream-BBBB2222bbbb")


def gateway_env(upstream_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "GATEWAY_CONFIG": str(SINGLE_ATTEMPT_CONFIG),
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        # Off for the shared gateway, so tests that repeat an edit see every upstream call;
        # cache tests build their own gateways with it on.
        "GATEWAY_CACHE_ENABLED": "false",
        # Key health of its own: gateways sharing the test Redis must not share cooldowns.
        "GATEWAY_POOL_NAMESPACE": "t-" + uuid.uuid4().hex[:12],
    }
    env.update(overrides)
    return env


def gateway_settings(upstream_url: str, **overrides: str) -> Settings:
    return load_settings(env=gateway_env(upstream_url, **overrides))


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeOpenAIUpstream]:
    fake = FakeOpenAIUpstream()
    with serve_in_thread(fake.app) as url:
        fake.url = url + "/v1"  # type: ignore[attr-defined]
        yield fake


@pytest.fixture
def upstream(fake_upstream: FakeOpenAIUpstream) -> Iterator[FakeOpenAIUpstream]:
    fake_upstream.reset()
    yield fake_upstream
    fake_upstream.reset()


@pytest.fixture
def gateway_url(fake_upstream: FakeOpenAIUpstream) -> Iterator[str]:
    # A fresh gateway per test, so key health (cooldowns, disabled keys) never leaks from one
    # test to the next.
    settings = gateway_settings(fake_upstream.url)  # type: ignore[attr-defined]
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture
def client(gateway_url: str, upstream: FakeOpenAIUpstream) -> OpenAI:
    return OpenAI(base_url=gateway_url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with test_redis_url() as (url, _server):
        yield url


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Under GATEWAY_TEST_REDIS_TOPOLOGY=cluster|sentinel only the tests that reach the shared
    # Redis (the `redis_url` fixture) say anything new; the rest already ran against one server.
    if os.environ.get("GATEWAY_TEST_REDIS_TOPOLOGY", "single") == "single":
        return
    keep = [item for item in items if "redis_url" in getattr(item, "fixturenames", ())]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
