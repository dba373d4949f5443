"""Acceptance (issue 19, state that survives): the cache may be evicted, state may not.

Real redis-server processes, started here with the options docker-compose.yml gives its `redis`
(state: AOF fsynced every second, noeviction) and `redis-cache` (no persistence, allkeys-lru)
services, so a change to those options fails these tests. The gateway runs in-process on a real
port, the fake upstream on another, and the real OpenAI SDK is the client.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
import yaml

from app.config.settings import Settings, load_settings
from app.main import create_app
from app.shared_state.factory import open_redis
from app.tenants.usage import SHOWN_COUNTERS, Usage, UsageLedger
from tests.fakes.openai_upstream import FakeOpenAIUpstream, RecordedRequest, Reply, images_response
from tests.support import images
from tests.support.constants import REPO, UPSTREAM_KEYS
from tests.support.gateway_config import MODEL, write_gateway_config
from tests.support.redis_server import PrivateRedis
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

COMPOSE = REPO / "docker-compose.yml"
ADMIN = {"authorization": "Bearer igw-admin-" + secrets.token_hex(8)}
CLIENT = "team"

StartRedis = Callable[..., PrivateRedis]


def compose_redis_options(service: str) -> list[str]:
    """The redis-server options docker-compose.yml runs `service` with."""
    command = yaml.safe_load(COMPOSE.read_text())["services"][service]["command"]
    assert command[0] == "redis-server", command
    return [str(word) for word in command[1:]]


@pytest.fixture
def start_redis() -> Iterator[StartRedis]:
    """Start private redis-servers (each its own port and directory); all removed at the end."""
    started: list[PrivateRedis] = []

    def start(*options: str) -> PrivateRedis:
        server = PrivateRedis()
        started.append(server)
        server.start(*options)
        return server

    yield start
    for server in started:
        server.remove()


def settings_for(
    directory: Path,
    upstream: FakeOpenAIUpstream,
    state: PrivateRedis,
    *,
    cache: PrivateRedis | None = None,
    limits: dict[str, int] | None = None,
) -> Settings:
    """A gateway with its state on `state`, its cache (on) on `cache` when given, one named
    client without keys of its own (they are created through the admin API) and admin keys."""
    config = write_gateway_config(
        directory,
        redis_url=state.url,
        clients={"named": {CLIENT: {"limits": limits or {}}}},
        cache={"enabled": True},
    )
    env = {
        "GATEWAY_CONFIG": str(config),
        "GATEWAY_UPSTREAM_URL": upstream.url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_ADMIN_KEYS": ADMIN["authorization"].removeprefix("Bearer "),
    }
    if cache is not None:
        env["GATEWAY_CACHE_REDIS_URL"] = cache.url
    return load_settings(env=env)


def create_client_key(url: str) -> str:
    created = httpx.post(url + f"/admin/clients/{CLIENT}/keys", headers=ADMIN, timeout=10)
    assert created.status_code == 201, created.text
    key: str = created.json()["key"]
    return key


def edit(url: str, key: str, prompt: str) -> Any:
    client = sdk_client(url, key=key)
    return client.images.with_raw_response.edit(
        image=("in.png", images.png(32, 32), "image/png"), prompt=prompt
    )


def large_results(record: RecordedRequest) -> Reply:
    """Every edit answered with a ~200 KB image that does not compress: a few fill 2 MB."""
    seed = int.from_bytes(secrets.token_bytes(4))
    return Reply(body=images_response(1, image=images.noise_png(256, 256, seed=seed)))


def wait_until_aof_written(server: PrivateRedis) -> None:
    """Until Redis has written its AOF buffer and has no fsync pending (bounded): everysec
    fsyncs within about a second, which is the most a crash may lose."""
    client = redis.Redis.from_url(server.url)
    deadline = time.monotonic() + 10
    while True:
        info = client.info("persistence")
        assert info["aof_enabled"] == 1 and info["aof_last_write_status"] == "ok"
        if info["aof_buffer_length"] == 0 and info["aof_pending_bio_fsync"] == 0:
            return
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def record_usage_on(server: PrivateRedis, namespace: str, day: date, usage: Usage) -> None:
    """Usage the gateway's own ledger records on an earlier UTC day (its clock set to it)."""
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=UTC).timestamp()

    async def record() -> None:
        client = open_redis(server.url, timeout=2.0)
        try:
            ledger = UsageLedger(client, namespace=namespace, clock=lambda: noon)
            await ledger.record(CLIENT, MODEL, usage)
        finally:
            await client.aclose()

    asyncio.run(record())


def test_usage_and_runtime_keys_survive_a_killed_redis(
    tmp_path: Path, upstream: FakeOpenAIUpstream, start_redis: StartRedis
) -> None:
    options = compose_redis_options("redis")
    state = start_redis(*options)
    settings = settings_for(tmp_path, upstream, state)
    today = datetime.now(UTC).date()
    earlier = today - timedelta(days=3)
    # One day past today too: edits made after midnight UTC still fall in the range.
    span = {"from": earlier.isoformat(), "to": (today + timedelta(days=1)).isoformat()}
    record_usage_on(
        state,
        settings.clients.namespace,
        earlier,
        Usage(requests=2, images=2, cost_nano_usd=80_000_000),
    )
    with serve_in_thread(create_app(settings)) as url:
        key = create_client_key(url)
        for prompt in ("survive one", "survive two", "survive three", "survive one"):
            assert edit(url, key, prompt).http_response.status_code == 200
        before = httpx.get(url + "/admin/usage", params=span, headers=ADMIN).json()
    (edits_row,) = [row for row in before["data"] if row["date"] != earlier.isoformat()]
    assert (edits_row["requests"], edits_row["images"], edits_row["cache_hits"]) == (4, 3, 1)
    assert len(upstream.edits) == 3

    wait_until_aof_written(state)
    state.kill()  # SIGKILL: no shutdown save
    state.start(*options)  # same port, same directory: it reloads its AOF

    # A fresh gateway (nothing of the first one's memory): all of it comes back from Redis.
    with serve_in_thread(create_app(settings)) as url:
        after = httpx.get(url + "/admin/usage", params=span, headers=ADMIN).json()
        assert after == before

        exported = httpx.get(
            url + "/admin/usage/export", params={**span, "format": "csv"}, headers=ADMIN
        )
        assert exported.status_code == 200
        assert exported.headers["content-type"] == "text/csv; charset=utf-8"
        assert exported.headers["content-disposition"] == (
            f"attachment; filename=usage-{span['from']}-{span['to']}.csv"
        )
        lines = exported.text.splitlines()
        assert lines[0].split(",") == ["client", "date", "model", *SHOWN_COUNTERS]
        rows = {row["date"]: row for row in csv.DictReader(io.StringIO(exported.text))}
        assert sorted(rows) == [earlier.isoformat(), edits_row["date"]]  # each day's row
        old = rows[earlier.isoformat()]
        assert (old["client"], old["model"], old["requests"], old["images"]) == (
            CLIENT,
            MODEL,
            "2",
            "2",
        )
        assert old["cost_usd"] == "0.080000000"
        new = rows[edits_row["date"]]
        assert (new["requests"], new["images"], new["cache_hits"]) == ("4", "3", "1")

        jsonl = httpx.get(
            url + "/admin/usage/export", params={**span, "format": "jsonl"}, headers=ADMIN
        )
        assert jsonl.headers["content-type"] == "application/x-ndjson"
        assert jsonl.headers["content-disposition"].endswith(".jsonl")
        lines = jsonl.text.splitlines()
        assert [json.loads(line) for line in lines] == sorted(
            before["data"], key=lambda row: row["date"]
        )

        # The key created through the admin API before the crash still works.
        assert edit(url, key, "after the crash").http_response.status_code == 200


def test_filling_the_cache_past_maxmemory_leaves_state_alone(
    tmp_path: Path, upstream: FakeOpenAIUpstream, start_redis: StartRedis
) -> None:
    state = start_redis(*compose_redis_options("redis"))
    # The compose cache Redis, with 2 MB instead of 1 GB: a handful of results fill it.
    cache = start_redis(*compose_redis_options("redis-cache"), "--maxmemory", "2mb")
    quota = 12
    settings = settings_for(
        tmp_path, upstream, state, cache=cache, limits={"images_per_day": quota}
    )
    upstream.responder = large_results
    with serve_in_thread(create_app(settings)) as url:
        key = create_client_key(url)
        for number in range(quota):
            response = edit(url, key, f"fill the cache {number}")
            assert response.http_response.status_code == 200
    cache_stats = redis.Redis.from_url(cache.url).info("stats")
    assert cache_stats["evicted_keys"] > 0  # the cache was full and evicted
    assert redis.Redis.from_url(state.url).info("stats")["evicted_keys"] == 0
    assert len(upstream.edits) == quota

    # Another replica, which never saw the key: it comes from the state Redis, intact.
    with serve_in_thread(create_app(settings)) as url:
        client = sdk_client(url, key=key)
        assert [model.id for model in client.models.list().data]
        shown = httpx.get(url + f"/admin/clients/{CLIENT}", headers=ADMIN).json()
        assert shown["quota_used"]["images_today"] == quota
        with pytest.raises(openai.RateLimitError) as refused:
            client.images.edit(image=("in.png", images.png(32, 32), "image/png"), prompt="one more")
        assert refused.value.code == "insufficient_quota"
    assert len(upstream.edits) == quota


CONFIG_CASES = {
    "no persistence": (
        ["--appendonly", "no", "--save", ""],
        {"persistence": "none", "eviction_policy": "noeviction"},
        "keeps nothing on disk",
    ),
    "allkeys-lru": (
        [*compose_redis_options("redis"), "--maxmemory-policy", "allkeys-lru"],
        {"persistence": "aof", "eviction_policy": "allkeys-lru"},
        "maxmemory-policy allkeys-lru evicts keys",
    ),
    "rdb snapshots, volatile-lru": (
        ["--save", "3600 1", "--maxmemory-policy", "volatile-lru"],
        {"persistence": "rdb", "eviction_policy": "volatile-lru"},
        "maxmemory-policy volatile-lru evicts keys",
    ),
    "compose": (
        compose_redis_options("redis"),
        {"persistence": "aof", "eviction_policy": "noeviction"},
        None,
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_startup_checks_the_state_redis_and_readyz_says_so(
    case: str,
    upstream: FakeOpenAIUpstream,
    start_redis: StartRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    options, expected, warning = CONFIG_CASES[case]
    state = start_redis(*options)
    caplog.set_level(logging.INFO, logger="gateway.redis")
    with serve_in_thread(create_app(settings_for(tmp_path, upstream, state))) as url:
        ready = httpx.get(url + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"  # a warning only
    section = ready.json()["state_redis"]
    assert {name: section[name] for name in expected} == expected
    assert section["shared_with_cache"] is True
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.name == "gateway.redis" and record.levelno >= logging.WARNING
    ]
    if warning is None:
        assert warnings == [] and section["warning"] is None
        return
    (line,) = warnings  # one line, however many checks ran
    assert warning in line and warning in section["warning"]
    assert str(state.port) not in line and "redis://" not in line


def test_startup_check_tolerates_config_being_disabled(
    upstream: FakeOpenAIUpstream,
    start_redis: StartRedis,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # As managed Redis services do: CONFIG renamed away.
    state = start_redis(*compose_redis_options("redis"), "--rename-command", "CONFIG", "")
    caplog.set_level(logging.INFO, logger="gateway.redis")
    with serve_in_thread(create_app(settings_for(tmp_path, upstream, state))) as url:
        ready = httpx.get(url + "/readyz")
        key = create_client_key(url)
        assert edit(url, key, "config is disabled").http_response.status_code == 200
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    section = ready.json()["state_redis"]
    assert (section["persistence"], section["eviction_policy"], section["warning"]) == (
        "unknown",
        None,
        None,
    )
    assert "CONFIG is refused" in section["note"]
    said = [r for r in caplog.records if r.name == "gateway.redis"]
    assert [r.levelno for r in said] == [logging.INFO]  # said once, not as an error
    assert "not checked" in said[0].getMessage()


def test_a_full_cache_redis_does_not_fail_edits(
    tmp_path: Path, upstream: FakeOpenAIUpstream, start_redis: StartRedis
) -> None:
    state = start_redis(*compose_redis_options("redis"))
    # No eviction and 2 MB: once full, every write to the cache is refused with OOM.
    cache = start_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction")
    settings = settings_for(tmp_path, upstream, state, cache=cache)
    upstream.responder = large_results
    edits = 10
    with serve_in_thread(create_app(settings)) as url:
        key = create_client_key(url)
        for number in range(edits):
            response = edit(url, key, f"a full cache {number}")
            assert response.http_response.status_code == 200
            assert response.parse().data[0].b64_json
    errors = redis.Redis.from_url(cache.url).info("errorstats")
    assert errors["errorstat_OOM"]["count"] > 0  # the cache's writes were refused
    assert len(upstream.edits) == edits
