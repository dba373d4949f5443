"""A Redis Cluster node goes away during a run of edits: every edit still answers 200 (the cache
fails open while the cluster is down), and when the node is back the gateway's Cluster client
finds the slots again by itself and caching resumes."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.scaleout.test_sentinel_failover import edit
from tests.support.gateway_env import gateway_settings
from tests.support.redis_topologies import ClusterDeployment, running_topology
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

RUN_SECONDS = 4.0  # longer than cluster-node-timeout (2 s): the cluster is declared down
RESUME_DEADLINE = 30.0


@pytest.fixture
def cluster() -> Iterator[ClusterDeployment]:
    with running_topology("cluster") as deployment:
        assert isinstance(deployment, ClusterDeployment)
        yield deployment


def test_cluster_node_loss_every_edit_answers_and_caching_resumes(
    cluster: ClusterDeployment, fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    settings = gateway_settings(
        fake_upstream.url,
        GATEWAY_REDIS_URL=cluster.url,
        GATEWAY_CACHE_ENABLED="true",
    )
    settings = settings.model_copy(
        update={"cache": settings.cache.model_copy(update={"redis_retry_after_seconds": 0.2})}
    )
    with serve_in_thread(create_app(settings)) as url:
        client = sdk_client(url)
        before = "cluster " + uuid.uuid4().hex
        assert edit(client, before) == (200, "miss")
        assert edit(client, before) == (200, "hit")
        lost = cluster.ports[1]
        cluster.kill(lost)

        statuses: list[int] = []
        bypassed = 0
        deadline = time.monotonic() + RUN_SECONDS
        while time.monotonic() < deadline:
            status, cache = edit(client, "during " + uuid.uuid4().hex)
            statuses.append(status)
            bypassed += cache == "bypass"
        assert statuses and set(statuses) == {200}
        assert bypassed >= 1

        cluster.restart(lost)
        cluster.wait_until_ok()
        after = "after " + uuid.uuid4().hex
        resumed = False
        deadline = time.monotonic() + RESUME_DEADLINE
        while time.monotonic() < deadline and not resumed:
            assert edit(client, after)[0] == 200
            status, cache = edit(client, after)
            assert status == 200
            resumed = cache == "hit"
            if not resumed:
                time.sleep(0.2)
        assert resumed
