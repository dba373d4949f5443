"""Acceptance 2: the Sentinel-monitored primary is killed during a run of edits. Every edit still
answers 200 (the cache is bypassed while there is no primary), the Sentinels promote the replica,
and caching resumes on it without restarting the gateway."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from openai import OpenAI

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.gateway_env import gateway_settings
from tests.support.redis_topologies import SentinelDeployment, running_topology
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

# Bounds: the run stops by itself even if the failover never completes.
FAILOVER_DEADLINE = 30.0
RESUME_DEADLINE = 20.0


@pytest.fixture
def sentinel() -> Iterator[SentinelDeployment]:
    with running_topology("sentinel") as deployment:
        assert isinstance(deployment, SentinelDeployment)
        yield deployment


def edit(client: OpenAI, prompt: str) -> tuple[int, str | None]:
    raw = client.images.with_raw_response.edit(
        image=("photo.png", images.png(), "image/png"), prompt=prompt
    )
    raw.parse()
    return raw.status_code, raw.headers.get("x-cache")


def entries_on(port: int) -> list[Any]:
    server = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    return list(server.scan_iter(match="igw:c1:*:entry", count=1000))


def test_sentinel_failover_every_edit_answers_and_caching_resumes_on_the_promoted_replica(
    sentinel: SentinelDeployment, fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    settings = gateway_settings(
        fake_upstream.url,
        GATEWAY_REDIS_URL=sentinel.url,
        GATEWAY_CACHE_ENABLED="true",
    )
    # Probe Redis again soon after a failure, so the test sees caching resume quickly.
    settings = settings.model_copy(
        update={"cache": settings.cache.model_copy(update={"redis_retry_after_seconds": 0.2})}
    )
    with serve_in_thread(create_app(settings)) as url:
        client = sdk_client(url)
        before = "failover " + uuid.uuid4().hex
        assert edit(client, before) == (200, "miss")
        assert edit(client, before) == (200, "hit")
        old_port = sentinel.kill_primary()

        # Edits keep coming while the Sentinels notice and promote the replica.
        statuses: list[int] = []
        bypassed = 0
        deadline = time.monotonic() + FAILOVER_DEADLINE
        while time.monotonic() < deadline:
            status, cache = edit(client, "during " + uuid.uuid4().hex)
            statuses.append(status)
            bypassed += cache == "bypass"
            if sentinel.primary()[1] != old_port:
                break
        new_port = sentinel.wait_for_new_primary(old_port, timeout=5)
        assert new_port == sentinel.replica_port
        assert statuses and set(statuses) == {200}
        assert bypassed >= 1  # some edits really ran while Redis had no primary

        # Caching resumes by itself on the promoted replica: an edit stored, then a hit.
        after = "after " + uuid.uuid4().hex
        resumed = False
        deadline = time.monotonic() + RESUME_DEADLINE
        while time.monotonic() < deadline and not resumed:
            status, _ = edit(client, after)
            assert status == 200
            status, cache = edit(client, after)
            assert status == 200
            resumed = cache == "hit"
            if not resumed:
                time.sleep(0.2)
        assert resumed
        # The entry from before the failover was replicated, so it is a hit again too.
        assert edit(client, before) == (200, "hit")
        assert len(entries_on(new_port)) >= 2
