"""GATEWAY_REDIS_URL: every accepted spelling, the client each one opens (without connecting),
and refusals that never repeat the password."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from app.config.settings import load_settings
from app.config.yaml_source import ConfigError
from app.shared_state.factory import RedisTarget, RedisUrlError, open_redis
from tests.support.constants import CONFIG

PASSWORD = "s3cret-redis-pass"


def test_redis_url_single_and_tls_are_left_to_redis_py() -> None:
    for url in ("redis://127.0.0.1:6379/2", f"rediss://:{PASSWORD}@cache.example:6380/0"):
        target = RedisTarget.parse(url)
        assert (target.mode, target.tls) == ("single", url.startswith("rediss"))
    client = open_redis("rediss://cache.example:6380/1?ssl_cert_reqs=none", timeout=0.5)
    kwargs = client.connection_pool.connection_kwargs
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    assert (kwargs["db"], kwargs["socket_timeout"]) == (1, 0.5)


def test_redis_url_sentinel_names_service_sentinels_and_db() -> None:
    url = (
        f"redis+sentinel://app:{PASSWORD}@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/3"
        "?sentinel_password=sentinel-pass"
    )
    target = RedisTarget.parse(url)
    assert target.mode == "sentinel" and not target.tls
    assert target.nodes == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (target.service, target.db) == ("mymaster", 3)
    assert (target.username, target.password) == ("app", PASSWORD)
    assert target.sentinel_password == "sentinel-pass"
    assert PASSWORD not in repr(target)


def test_redis_url_sentinel_client_follows_the_service() -> None:
    url = f"rediss+sentinel://:{PASSWORD}@127.0.0.1:26379/mymaster/2"
    client = open_redis(url, timeout=0.3)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2
    assert pool.connection_kwargs["password"] == PASSWORD
    assert pool.connection_class.__name__ == "SentinelManagedSSLConnection"
    asyncio.run(client.aclose())


def test_redis_url_cluster_opens_a_cluster_client_from_startup_nodes() -> None:
    target = RedisTarget.parse("rediss+cluster://node-a:7000,node-b:7001")
    assert (target.mode, target.tls, target.db) == ("cluster", True, 0)
    client = open_redis("redis+cluster://node-a:7000,node-b", timeout=0.3)
    assert isinstance(client, RedisCluster)
    nodes = sorted(client.nodes_manager.startup_nodes)
    assert nodes == ["node-a:7000", "node-b:6379"]
    asyncio.run(client.aclose())
    assert isinstance(open_redis("redis://127.0.0.1/0", timeout=1), aioredis.Redis)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"http://:{PASSWORD}@host/0", "unknown scheme"),
        (f"redis+cluster://:{PASSWORD}@h:7000/2", "database 0 only"),
        (f"redis+sentinel://:{PASSWORD}@h:26379", "names its service"),
        (f"redis+sentinel://:{PASSWORD}@h:port/svc/0", "port"),
        (f"redis+sentinel://:{PASSWORD}@h:26379/svc/x", "database must be a number"),
        (f"redis+cluster://:{PASSWORD}@/", "at least one host"),
        (f"redis+cluster://:{PASSWORD}@h:7000?password={PASSWORD}", "unknown options"),
    ],
)
def test_redis_url_refusals_say_why_without_the_password(url: str, message: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        RedisTarget.parse(url)
    assert message in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_redis_url_config_refuses_a_bad_url_at_startup() -> None:
    env = {
        "GATEWAY_CONFIG": str(CONFIG),
        "GATEWAY_UPSTREAM_KEYS": "sk-x",
        "GATEWAY_CLIENT_KEYS": "k",
        "GATEWAY_REDIS_URL": f"redis+cluster://:{PASSWORD}@h:7000/5",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert "GATEWAY_REDIS_URL" in str(caught.value) and PASSWORD not in str(caught.value)
    env["GATEWAY_REDIS_URL"] = "redis+sentinel://127.0.0.1:26379/mymaster/0"
    assert load_settings(env=env).redis_url is not None


def test_redis_url_cache_redis_url_takes_the_same_forms_and_refusals() -> None:
    env = {
        "GATEWAY_CONFIG": str(CONFIG),
        "GATEWAY_UPSTREAM_KEYS": "sk-x",
        "GATEWAY_CLIENT_KEYS": "k",
        "GATEWAY_CACHE_REDIS_URL": f"redis+sentinel://:{PASSWORD}@h:26379",
    }
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    assert "GATEWAY_CACHE_REDIS_URL" in str(caught.value) and PASSWORD not in str(caught.value)
    for url in (
        f"rediss://:{PASSWORD}@cache.example:6380/1",
        "redis+sentinel://s1:26379,s2:26379/cache/0",
        "redis+cluster://node-a:7000,node-b:7001",
    ):
        settings = load_settings(env={**env, "GATEWAY_CACHE_REDIS_URL": url})
        assert settings.cache_redis_url is not None and settings.redis_url is None
        assert settings.cache_redis_url.get_secret_value() == url
