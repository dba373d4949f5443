"""Acceptance 6: two gateway processes (`image-gateway serve`) share one real Redis, and a
cooldown caused through one is honoured by the other."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

from tests.e2e.test_key_pool import ADMIN_KEY, CLIENT_KEY, KEYS, edit, upstream_config
from tests.fakes.faulty_upstream import FaultyUpstream, error_reply
from tests.support.gateway_config import write_routing_config
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, serve_in_thread, wait_for_port

CLI = Path(sys.executable).parent / "image-gateway"


@contextmanager
def gateway_process(env: dict[str, str], log: Path) -> Iterator[str]:
    port = free_port()
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(CLI), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)


def test_pool_cooldown_through_one_process_is_honoured_by_another(
    tmp_path: Path, redis_url: str
) -> None:
    fake = FaultyUpstream()
    fake.by_key[KEYS[0]] = error_reply(429, "rate_limit_exceeded", retry_after="30")
    with ExitStack() as stack:
        fake_url = stack.enter_context(serve_in_thread(fake.app)) + "/v1"
        upstream = upstream_config(fake_url, KEYS[:2], "SHARED_POOL_KEYS")
        del upstream["keys"]
        config = write_routing_config(
            tmp_path,
            {"default": upstream},
            pool={"namespace": "t-" + uuid.uuid4().hex[:12]},
        )
        env = {
            "GATEWAY_CONFIG": str(config),
            "SHARED_POOL_KEYS": ",".join(KEYS[:2]),
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
            "GATEWAY_ADMIN_KEYS": ADMIN_KEY,
            "GATEWAY_REDIS_URL": redis_url,
        }
        first = stack.enter_context(gateway_process(env, tmp_path / "first.log"))
        second = stack.enter_context(gateway_process(env, tmp_path / "second.log"))

        assert edit(sdk_client(first)).data  # key 1 answers 429, key 2 serves
        assert fake.edits_with(KEYS[0]) == 1
        # A fresh process would try key 1 first; the shared cooldown keeps it away.
        client = sdk_client(second)
        for _ in range(5):
            assert edit(client).data
        assert fake.edits_with(KEYS[0]) == 1
        assert fake.edits_with(KEYS[1]) == 6
        response = httpx.get(
            second + "/admin/keys", headers={"authorization": f"Bearer {ADMIN_KEY}"}
        )
        body = response.json()
        assert body["store"] == "redis"
        cooling = {item["id"]: item for item in body["data"]}["default#1"]
        assert (cooling["state"], cooling["reason"]) == ("cooling", "rate_limited")
    for log in ("first.log", "second.log"):
        text = (tmp_path / log).read_text()
        assert not any(key in text for key in KEYS)  # no secret in either process's log
