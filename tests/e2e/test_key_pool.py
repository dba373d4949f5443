"""Acceptance of the key pool, routing and retries: the real OpenAI SDK against the gateway on a
real port, in front of fault-injecting fake upstreams on real ports."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.faulty_upstream import FaultyUpstream, error_reply
from tests.fakes.openai_upstream import Reply
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_config import MODEL, write_routing_config
from tests.support.prom import total
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, serve_in_thread

ADMIN_KEY = "igw-test-admin-key-pool-0123456789"
KEYS = ("sk-pool-key-one-1111", "sk-pool-key-two-2222", "sk-pool-key-three-3333")
IMAGE = images.png(32, 32)


class Harness:
    def __init__(self, stack: ExitStack, directory: Path) -> None:
        self._stack = stack
        self._directory = directory

    def upstream(self) -> FaultyUpstream:
        fake = FaultyUpstream()
        url = self._stack.enter_context(serve_in_thread(fake.app))
        fake.url = url + "/v1"
        return fake

    def gateway(self, upstreams: dict[str, dict[str, Any]], **config: Any) -> str:
        env: dict[str, str] = {}
        for upstream in upstreams.values():
            # Keys live in the environment only, as in production.
            env[upstream["keys_env"]] = ",".join(upstream.pop("keys"))
        env["GATEWAY_CONFIG"] = str(write_routing_config(self._directory, upstreams, **config))
        env["GATEWAY_CLIENT_KEYS"] = CLIENT_KEY
        env["GATEWAY_ADMIN_KEYS"] = ADMIN_KEY
        settings = load_settings(env=env)
        return self._stack.enter_context(serve_in_thread(create_app(settings)))


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    with ExitStack() as stack:
        yield Harness(stack, tmp_path)


def upstream_config(
    fake: FaultyUpstream | str, keys: tuple[str, ...], env: str, **extra: Any
) -> dict[str, Any]:
    url = fake if isinstance(fake, str) else fake.url
    return {"type": "openai", "base_url": url, "keys_env": env, "keys": list(keys), **extra}


def edit(client: OpenAI) -> Any:
    return client.images.edit(image=("a.png", IMAGE, "image/png"), prompt="x", model=MODEL)


def admin_keys(url: str) -> dict[str, dict[str, Any]]:
    response = httpx.get(url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return {item["id"]: item for item in response.json()["data"]}


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def test_pool_rate_limited_key_is_tried_at_most_once_during_its_cooldown(harness: Harness) -> None:
    fake = harness.upstream()
    fake.by_key[KEYS[1]] = error_reply(429, "rate_limit_exceeded", retry_after="30")
    url = harness.gateway({"default": upstream_config(fake, KEYS, "POOL_KEYS")})
    client = sdk_client(url)
    started = time.monotonic()
    for _ in range(100):
        assert edit(client).data[0].b64_json
    assert fake.edits_with(KEYS[1]) == 1
    assert len(fake.edits) == 101
    view = admin_keys(url)["default#2"]
    assert view["state"] == "cooling" and view["reason"] == "rate_limited"
    # The cooldown is the 30 s the 429 asked for, counted from that answer (which came after
    # `started`): however long the 100 edits took on a busy machine.
    elapsed = time.monotonic() - started
    assert 30 - elapsed - 0.01 <= view["cooldown_left"] <= 30


def test_pool_key_refused_with_401_is_disabled_then_probed_back(harness: Harness) -> None:
    fake = harness.upstream()
    fake.refused_keys.add(KEYS[0])
    url = harness.gateway({"default": upstream_config(fake, KEYS[:2], "POOL_KEYS")})
    client = sdk_client(url)
    for _ in range(10):
        edit(client)
    assert fake.edits_with(KEYS[0]) == 1  # disabled after its first 401
    view = admin_keys(url)["default#1"]
    assert (view["state"], view["reason"]) == ("disabled", "auth")
    # The probe keeps failing while the key is refused: still no edit on it.
    wait_for(lambda: sum(1 for p in fake.probes if p.key == KEYS[0]) >= 2)
    for _ in range(5):
        edit(client)
    assert fake.edits_with(KEYS[0]) == 1
    assert all(p.method == "GET" for p in fake.probes)  # never a paid call
    fake.refused_keys.clear()
    wait_for(lambda: admin_keys(url)["default#1"]["state"] == "healthy")
    for _ in range(4):
        edit(client)
    assert fake.edits_with(KEYS[0]) >= 2  # back in rotation, no restart


def test_pool_all_keys_rate_limited_gives_429_with_earliest_retry_after(harness: Harness) -> None:
    fake = harness.upstream()
    fake.by_key[KEYS[0]] = error_reply(429, "rate_limit_exceeded", retry_after="30")
    fake.by_key[KEYS[1]] = error_reply(429, "rate_limit_exceeded", retry_after_ms="20000")
    url = harness.gateway({"default": upstream_config(fake, KEYS[:2], "POOL_KEYS")})
    client = sdk_client(url)
    with pytest.raises(openai.RateLimitError) as caught:
        edit(client)
    assert int(caught.value.response.headers["retry-after"]) in (19, 20)
    assert caught.value.response.headers["x-should-retry"] == "false"  # failover happened
    assert len(fake.edits) == 2
    # While both cool, nothing goes upstream and the answer says when to come back.
    with pytest.raises(openai.RateLimitError) as again:
        edit(client)
    assert int(again.value.response.headers["retry-after"]) in (19, 20)
    assert again.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert len(fake.edits) == 2


def test_pool_key_failing_five_times_is_ejected_and_traffic_moves(harness: Harness) -> None:
    fake = harness.upstream()
    fake.by_key[KEYS[0]] = error_reply(500)
    url = harness.gateway({"default": upstream_config(fake, KEYS, "POOL_KEYS")})
    client = sdk_client(url)
    for _ in range(30):
        assert edit(client).data  # each 500 is retried once, on another key
    # Its 1st failure counts (no sibling called yet); its 2nd does not: one success on each
    # sibling is too few calls to tell the key from the upstream. From the 3rd on it clearly
    # fails more than its siblings: the 3rd to 6th make the five that eject it.
    assert fake.edits_with(KEYS[0]) == 6
    assert fake.edits_with(KEYS[1]) + fake.edits_with(KEYS[2]) == 30
    view = admin_keys(url)["default#1"]
    assert (view["state"], view["reason"], view["times_ejected"]) == ("ejected", "server", 1)
    assert [e["kind"] for e in view["recent_errors"]] == ["server"] * 5


def test_pool_hanging_upstream_gives_504_by_the_model_timeout_with_one_post(
    harness: Harness,
) -> None:
    fake = harness.upstream()
    for key in KEYS:
        # Long past the model's timeout + 1 s, short enough to end by itself before teardown.
        fake.by_key[key] = Reply(delay=3)
    url = harness.gateway(
        {"default": upstream_config(fake, KEYS, "POOL_KEYS")}, model={"timeout": 1}
    )
    client = sdk_client(url)
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        edit(client)
    elapsed = time.monotonic() - started
    assert caught.value.status_code == 504
    assert elapsed < 1 + 1
    assert len(fake.edits) == 1  # never resent: the edit may be running, and billed
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_pool_priority_falls_back_to_secondary_when_primary_keys_are_disabled(
    harness: Harness,
) -> None:
    primary, secondary = harness.upstream(), harness.upstream()
    primary.refused_keys.update(KEYS[:2])
    url = harness.gateway(
        {
            "primary": upstream_config(primary, KEYS[:2], "PRIMARY_KEYS", priority=0),
            "secondary": upstream_config(secondary, KEYS[2:], "SECONDARY_KEYS", priority=1),
        }
    )
    client = sdk_client(url)
    for _ in range(5):
        assert edit(client).data
    assert len(primary.edits) == 2  # each primary key once, then disabled
    assert len(secondary.edits) == 5
    states = admin_keys(url)
    assert states["primary#1"]["state"] == states["primary#2"]["state"] == "disabled"
    metrics = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {CLIENT_KEY}"}).text
    # Only the first request failed over; the next ones went straight to the secondary.
    assert total(metrics, "gateway_upstream_failovers_total", to_upstream="secondary") == 1
    assert total(metrics, "gateway_upstream_retries_total", upstream="primary", reason="auth") == 2


def test_pool_prefers_primary_tier_while_it_is_healthy(harness: Harness) -> None:
    primary, secondary = harness.upstream(), harness.upstream()
    url = harness.gateway(
        {
            "secondary": upstream_config(secondary, KEYS[2:], "SECONDARY_KEYS", priority=1),
            "primary": upstream_config(primary, KEYS[:2], "PRIMARY_KEYS", priority=0),
        }
    )
    client = sdk_client(url)
    for _ in range(6):
        edit(client)
    assert len(primary.edits) == 6 and not secondary.edits


def test_pool_connection_refused_fails_over_to_the_next_upstream(harness: Harness) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    alive = harness.upstream()
    url = harness.gateway(
        {
            "dead": upstream_config(dead, KEYS[:1], "DEAD_KEYS", priority=0),
            "alive": upstream_config(alive, KEYS[1:2], "ALIVE_KEYS", priority=1),
        }
    )
    assert edit(sdk_client(url)).data
    assert len(alive.edits) == 1


def test_pool_upstream_4xx_passes_through_unchanged_and_is_not_retried(
    harness: Harness,
) -> None:
    fake = harness.upstream()
    blocked = {
        "error": {
            "message": "Your request was rejected by the safety system.",
            "type": "image_generation_user_error",
            "param": None,
            "code": "moderation_blocked",
        }
    }
    fake.enqueue(Reply(status=400, body=blocked))
    url = harness.gateway({"default": upstream_config(fake, KEYS, "POOL_KEYS")})
    with pytest.raises(openai.BadRequestError) as caught:
        edit(sdk_client(url))
    assert caught.value.body == blocked["error"]
    assert len(fake.edits) == 1
    assert all(view["state"] == "healthy" for view in admin_keys(url).values())


def test_pool_server_error_is_retried_once_then_reported(harness: Harness) -> None:
    fake = harness.upstream()
    for key in KEYS:
        fake.by_key[key] = error_reply(503)
    url = harness.gateway({"default": upstream_config(fake, KEYS, "POOL_KEYS")})
    with pytest.raises(openai.InternalServerError) as caught:
        edit(sdk_client(url))
    assert caught.value.status_code == 502
    assert len(fake.edits) == 2  # the first try and one retry on another key
    assert len({r.key for r in fake.edits}) == 2
    assert caught.value.response.headers["x-should-retry"] == "false"


def test_pool_all_keys_disabled_gives_503(harness: Harness) -> None:
    fake = harness.upstream()
    fake.by_key[KEYS[0]] = error_reply(402, "insufficient_quota")
    fake.refused_keys.add(KEYS[1])
    url = harness.gateway({"default": upstream_config(fake, KEYS[:2], "POOL_KEYS")})
    client = sdk_client(url)
    with pytest.raises(openai.InternalServerError) as first:
        edit(client)  # both keys fail in this request: its last failure is reported
    assert first.value.status_code == 502
    assert first.value.body["code"] == "upstream_auth_failed"  # type: ignore[index]
    assert first.value.response.headers["x-should-retry"] == "false"
    with pytest.raises(openai.InternalServerError) as caught:
        edit(client)
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "no_upstream_key_available"  # type: ignore[index]
    assert len(fake.edits) == 2  # nothing usable: nothing sent
    states = admin_keys(url)
    assert (states["default#1"]["reason"], states["default#2"]["reason"]) == ("quota", "auth")


def test_pool_key_at_its_concurrency_cap_is_skipped(harness: Harness) -> None:
    import concurrent.futures

    fake = harness.upstream()
    fake.by_key[KEYS[0]] = Reply(delay=0.5)
    url = harness.gateway(
        {"default": upstream_config(fake, KEYS[:2], "POOL_KEYS", key_limits={"max_concurrency": 1})}
    )
    client = sdk_client(url)
    with concurrent.futures.ThreadPoolExecutor(4) as workers:
        results = list(workers.map(lambda _: edit(client), range(2)))
    assert all(result.data for result in results)
    assert fake.edits_with(KEYS[0]) == 1 and fake.edits_with(KEYS[1]) == 1


def test_admin_keys_needs_the_admin_key_and_never_shows_secrets(harness: Harness) -> None:
    fake = harness.upstream()
    fake.by_key[KEYS[0]] = error_reply(429, retry_after="5")
    url = harness.gateway({"default": upstream_config(fake, KEYS, "POOL_KEYS")})
    edit(sdk_client(url))
    as_client = httpx.get(url + "/admin/keys", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert as_client.status_code == 401
    assert httpx.get(url + "/admin/keys").status_code == 401
    response = httpx.get(url + "/admin/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200
    assert [item["id"] for item in response.json()["data"]] == [
        "default#1",
        "default#2",
        "default#3",
    ]
    assert response.json()["data"][0]["upstream"] == "default"
    for secret in (*KEYS, CLIENT_KEY, ADMIN_KEY):
        assert secret not in response.text
    # The admin key opens nothing else.
    as_admin = httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert as_admin.status_code == 401


def test_admin_keys_is_off_without_an_admin_key(tmp_path: Path) -> None:
    fake = FaultyUpstream()
    with serve_in_thread(fake.app) as fake_url:
        upstream = upstream_config(fake_url + "/v1", KEYS[:1], "POOL_KEYS")
        del upstream["keys"]
        config = write_routing_config(tmp_path, {"default": upstream})
        settings = load_settings(
            env={
                "GATEWAY_CONFIG": str(config),
                "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
                "POOL_KEYS": KEYS[0],
            }
        )
        with serve_in_thread(create_app(settings)) as url:
            for key in (CLIENT_KEY, "anything"):
                response = httpx.get(
                    url + "/admin/keys", headers={"authorization": f"Bearer {key}"}
                )
                assert response.status_code == 404
                assert response.json()["error"]["code"] == "not_found"
