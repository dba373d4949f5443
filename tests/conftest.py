"""Shared fixtures: a fake upstream and the gateway on real loopback ports, the real OpenAI SDK
as the client, and a private Redis server. Fixtures only: what tests import as a library lives in
tests/support/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support.gateway_env import gateway_settings
from tests.support.log_watch import (  # noqa: F401 (an autouse fixture and summary hooks)
    no_traceback_from_client_input,
    pytest_sessionfinish,
    pytest_terminal_summary,
    pytest_testnodedown,
)
from tests.support.redis_server import test_redis_url
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread


@pytest.fixture(scope="session")
def fake_upstream() -> Iterator[FakeOpenAIUpstream]:
    fake = FakeOpenAIUpstream()
    with serve_in_thread(fake.app) as url:
        fake.url = url + "/v1"
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
    settings = gateway_settings(fake_upstream.url)
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def refusing_gateway_url(fake_upstream: FakeOpenAIUpstream) -> Iterator[str]:
    """One gateway for a whole module whose tests are refused before an upstream key is used
    (bad input, no client key) or succeed: such tests leave no key health behind, so a gateway
    each would only cost a start and a stop per test. Such a module overrides `gateway_url`
    with this one."""
    settings = gateway_settings(fake_upstream.url)
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.fixture
def client(gateway_url: str, upstream: FakeOpenAIUpstream) -> OpenAI:
    return sdk_client(gateway_url)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with test_redis_url() as (url, _server):
        yield url


# Files run in this order of their directories: the long scenarios (Redis topologies, replicas,
# subprocess gateways) first, the many short unit tests last, so that under pytest-xdist no
# worker is left with a long file while the others have finished.
_DIRECTORY_ORDER = ("scaleout", "e2e", "hardening", "deploy", "unit")
_TESTS = Path(__file__).parent


def _directory_rank(item: pytest.Item) -> int:
    try:
        directory = item.path.relative_to(_TESTS).parts[0]
    except ValueError:
        return len(_DIRECTORY_ORDER)
    if directory in _DIRECTORY_ORDER:
        return _DIRECTORY_ORDER.index(directory)
    return len(_DIRECTORY_ORDER)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    items.sort(key=_directory_rank)  # stable: each file keeps its tests' order
    # Under GATEWAY_TEST_REDIS_TOPOLOGY=cluster|sentinel only the tests that reach the shared
    # Redis (the `redis_url` fixture) say anything new; the rest already ran against one server.
    if os.environ.get("GATEWAY_TEST_REDIS_TOPOLOGY", "single") == "single":
        return
    keep = [item for item in items if "redis_url" in getattr(item, "fixturenames", ())]
    dropped = [item for item in items if item not in keep]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    # `-n auto`: one worker more than CPUs, as most tests spend their time waiting on sockets,
    # subprocesses and timeouts rather than computing.
    return len(os.sched_getaffinity(0)) + 1
