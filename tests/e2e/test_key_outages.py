"""Acceptance (issue 18, lines 2 and 3): an upstream-wide fault never becomes an outage made by
the gateway. The real OpenAI SDK (max_retries=0, so every answer is the gateway's own) against a
gateway on a real port whose key health lives in a real Redis, in front of a fake upstream that
fails a seeded share of its calls or stops listening."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest

from app.config.settings import load_settings
from app.main import create_app
from tests.e2e.test_key_pool import ADMIN_KEY, CLIENT_KEY, KEYS, admin_keys, edit
from tests.fakes.faulty_upstream import FaultyUpstream, SwitchableListener, error_reply
from tests.support.gateway_config import write_routing_config
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

STORM_SHARE = 0.30
STORM_REQUESTS = 600
CONCURRENCY = 12


def gateway(stack: ExitStack, directory: Path, upstream_url: str, redis_url: str) -> str:
    """A gateway with three keys on one upstream, key health shared through Redis, defaults
    everywhere else (eject_after 5, eject_base 30 s, one retry of a 5xx on another key)."""
    config = write_routing_config(
        directory,
        {"default": {"type": "openai", "base_url": upstream_url + "/v1", "keys_env": "OUT_KEYS"}},
        pool={"namespace": "t-" + uuid.uuid4().hex[:12]},
    )
    settings = load_settings(
        env={
            "GATEWAY_CONFIG": str(config),
            "OUT_KEYS": ",".join(KEYS),
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
            "GATEWAY_ADMIN_KEYS": ADMIN_KEY,
            "GATEWAY_REDIS_URL": redis_url,
        }
    )
    assert settings.pool.eject_after == 5 and settings.retry.server_error_retries == 1
    return stack.enter_context(serve_in_thread(create_app(settings)))


def outcome(client: openai.OpenAI) -> tuple[int, str | None]:
    """The status the client saw, and the error code when it failed."""
    try:
        edit(client)
    except openai.APIStatusError as error:
        body: Any = error.body
        return error.status_code, body.get("code") if isinstance(body, dict) else None
    return 200, None


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


def test_outage_500_storm_across_all_keys_fails_no_more_than_it_injects(
    stack: ExitStack, tmp_path: Path, redis_url: str
) -> None:
    fake = FaultyUpstream()
    fake.latency = 0.03  # concurrent requests overlap upstream, as in the soak
    url = gateway(stack, tmp_path, stack.enter_context(serve_in_thread(fake.app)), redis_url)
    client = sdk_client(url)
    assert outcome(client) == (200, None)

    fake.start_storm(STORM_SHARE, seed=18)
    with ThreadPoolExecutor(CONCURRENCY) as workers:
        results = list(workers.map(lambda _: outcome(client), range(STORM_REQUESTS)))
    fake.end_storm()

    injected = fake.storm_failures / fake.storm_edits
    assert 0.25 < injected < 0.35, injected  # the fault is what the test says it is
    statuses = Counter(status for status, _ in results)
    failed = sum(count for status, count in statuses.items() if status != 200)
    codes = Counter(code for _, code in results if code is not None)
    report = f"{statuses}, {codes}, injected {injected:.3f} of {fake.storm_edits} upstream calls"
    assert failed / len(results) <= STORM_SHARE + 0.05, report
    assert codes["no_upstream_key_available"] == 0, report
    assert statuses.keys() <= {200, 502}, report  # only the upstream's own 500s, passed on
    # At most one of the three keys may be out at once (pool.max_ejected_share).
    ejected = [key for key, view in admin_keys(url).items() if view["state"] == "ejected"]
    assert len(ejected) <= 1, (ejected, report)

    # The fault is over: the very next request is served.
    assert outcome(client) == (200, None)


@pytest.mark.parametrize("fault", ["refused", "503"])
def test_outage_first_request_after_the_upstream_returns_succeeds(
    stack: ExitStack, tmp_path: Path, redis_url: str, fault: str
) -> None:
    fake = FaultyUpstream()
    listener = SwitchableListener(fake.app)
    stack.callback(listener.close)
    listener.up()
    url = gateway(stack, tmp_path, listener.url, redis_url)
    client = sdk_client(url)
    assert outcome(client) == (200, None)

    # Down: enough traffic that every key sees its five consecutive failures several times over
    # (each request tries every key), far inside the 30 s a key would be ejected for.
    if fault == "refused":
        listener.down()
    else:
        fake.start_storm(1.0, seed=0, reply=error_reply(503))
    during = [outcome(client) for _ in range(12)]
    if fault == "refused":
        listener.up()
    else:
        fake.end_storm()

    edits_before = len(fake.edits)
    assert outcome(client) == (200, None), during
    assert len(fake.edits) == edits_before + 1  # served by the upstream on the first try
    assert all(view["state"] == "healthy" for view in admin_keys(url).values())
    # While down, clients were told the upstream failed, never that the gateway had no key.
    assert all(status == 502 for status, _ in during), during
    if fault == "refused":
        assert {code for _, code in during} == {"upstream_unreachable"}, during
