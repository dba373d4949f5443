"""The state Redis' persistence and eviction policy, read from real redis-servers: the verdict
for each setting, every primary of a Cluster, CONFIG refused or Redis away (never a raise), and
one log line per change of verdict."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
import redis

from app.shared_state.durability import Durability, DurabilityCheck, judge, read_durability
from app.shared_state.factory import open_redis
from tests.support.redis_server import PrivateRedis
from tests.support.redis_topologies import running_topology
from tests.support.servers import free_port


@pytest.mark.parametrize(
    ("config", "persistence", "warns"),
    [
        ({"appendonly": "yes", "save": "", "maxmemory-policy": "noeviction"}, "aof", None),
        ({"appendonly": "yes", "save": "3600 1", "maxmemory-policy": "noeviction"}, "aof", None),
        ({"appendonly": "no", "save": "3600 1", "maxmemory-policy": "noeviction"}, "rdb", None),
        (
            {"appendonly": "no", "save": "", "maxmemory-policy": "noeviction"},
            "none",
            "keeps nothing on disk",
        ),
        (
            {"appendonly": "yes", "save": "", "maxmemory-policy": "allkeys-lru"},
            "aof",
            "allkeys-lru evicts",
        ),
        # Usage, quotas and key health have TTLs: volatile-* evicts them as well.
        (
            {"appendonly": "yes", "save": "", "maxmemory-policy": "volatile-ttl"},
            "aof",
            "volatile-ttl evicts",
        ),
    ],
)
def test_durability_judge(config: dict[str, str], persistence: str, warns: str | None) -> None:
    verdict = judge(config)
    assert verdict.persistence == persistence
    assert verdict.eviction_policy == config["maxmemory-policy"]
    if warns is None:
        assert verdict.warning is None
    else:
        assert verdict.warning is not None and warns in verdict.warning


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    started = PrivateRedis()
    yield started
    started.remove()


def read(url: str) -> Durability:
    async def run() -> Durability:
        client = open_redis(url, timeout=1.0)
        try:
            return await read_durability(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_durability_read_from_a_server(server: PrivateRedis) -> None:
    server.start("--appendonly", "yes", "--maxmemory-policy", "allkeys-lfu")
    verdict = read(server.url)
    assert (verdict.persistence, verdict.eviction_policy) == ("aof", "allkeys-lfu")
    assert verdict.warning is not None and verdict.note is None


def test_durability_unknown_when_config_is_refused_or_redis_is_away(server: PrivateRedis) -> None:
    server.start("--rename-command", "CONFIG", "")
    refused = read(server.url)
    assert (refused.persistence, refused.eviction_policy, refused.warning) == (
        "unknown",
        None,
        None,
    )
    assert refused.note is not None and "CONFIG is refused" in refused.note
    for url in (f"redis://127.0.0.1:{free_port()}/0", f"redis+cluster://127.0.0.1:{free_port()}"):
        away = read(url)
        assert away.persistence == "unknown" and away.note is not None
        assert "did not answer" in away.note


def test_durability_check_logs_once_per_change(
    server: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    server.start()  # the test default: no AOF, no save points
    caplog.set_level(logging.INFO, logger="gateway.redis")

    async def run() -> list[Durability]:
        client = open_redis(server.url, timeout=1.0)
        check = DurabilityCheck(client, shared_with_cache=False)
        try:
            seen = [await check.check(), await check.check()]
            await client.config_set("save", "3600 1")
            seen += [await check.check(), await check.check()]
            assert check.as_json() == {
                "persistence": "rdb",
                "eviction_policy": "noeviction",
                "warning": None,
                "shared_with_cache": False,
            }
            return seen
        finally:
            await client.aclose()

    seen = asyncio.run(run())
    assert [verdict.persistence for verdict in seen] == ["none", "none", "rdb", "rdb"]
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "gateway.redis"]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO]
    assert "keeps nothing on disk" in said[0][1]
    assert said[1][1] == "state Redis: persistence rdb, maxmemory-policy noeviction"


def test_durability_reads_every_cluster_primary() -> None:
    with running_topology("cluster") as cluster:
        assert cluster.url.startswith("redis+cluster://")
        ports = cluster.ports  # type: ignore[union-attr]
        nodes = [redis.Redis(host="127.0.0.1", port=port) for port in ports]
        # Started without persistence: every primary says so.
        assert read(cluster.url).persistence == "none"
        for node in nodes:
            node.config_set("save", "3600 1")
        verdict = read(cluster.url)
        assert (verdict.persistence, verdict.warning) == ("rdb", None)
        # One primary of three evicting is enough to warn.
        nodes[-1].config_set("maxmemory-policy", "allkeys-lru")
        verdict = read(cluster.url)
        assert verdict.eviction_policy == "allkeys-lru" and verdict.warning is not None
