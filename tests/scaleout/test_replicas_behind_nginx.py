"""Acceptance 3: three gateway processes behind nginx (round robin), sharing one Redis. A key's
cooldown caused through one replica keeps every replica away from that key, and a client's rate
limit counts its requests on all three together."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.fakes.openai_upstream import FakeOpenAIUpstream, RecordedRequest, Reply
from tests.support import images
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_process import gateway_process
from tests.support.nginx import REPLICA_HEADER, nginx_round_robin
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

REPLICAS = 3
CLIENT_KEY = "igw-scaleout-client-" + secrets.token_hex(12)
LIMITED_KEY = "igw-scaleout-limited-" + secrets.token_hex(12)
UPSTREAM_KEYS = ("sk-scaleout-key-one-1111", "sk-scaleout-key-two-2222")
REQUESTS_PER_MINUTE = 4


class KeyedUpstream(FakeOpenAIUpstream):
    """Answers each upstream key as scripted in `by_key` (200 otherwise)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_key: dict[str, Reply] = {}

    def reset(self) -> None:
        super().reset()
        self.responder = self._by_key

    def _by_key(self, record: RecordedRequest) -> Reply:
        return self.by_key.get(record.key or "", Reply())

    def edits_with(self, key: str) -> int:
        return sum(1 for record in self.edits if record.key == key)


@dataclass
class Deployment:
    url: str  # nginx
    upstream: KeyedUpstream
    logs: list[Path]


@pytest.fixture(scope="module")
def deployment(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("scaleout")
    with ExitStack() as stack:
        fake = KeyedUpstream()
        fake.reset()
        fake_url = stack.enter_context(serve_in_thread(fake.app)) + "/v1"
        clients = {
            "namespace": "t-" + uuid.uuid4().hex[:12],
            "named": {
                "limited": {
                    "keys_env": "SCALEOUT_LIMITED_KEYS",
                    "limits": {"requests_per_minute": REQUESTS_PER_MINUTE},
                }
            },
        }
        # Cache off: repeated identical edits must reach the upstream, whose calls are counted.
        path = write_gateway_config(directory, clients=clients, cache={"enabled": False})
        env = {
            "GATEWAY_CONFIG": str(path),
            "GATEWAY_REDIS_URL": redis_url,
            "GATEWAY_UPSTREAM_URL": fake_url,
            "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
            "GATEWAY_POOL_NAMESPACE": "t-" + uuid.uuid4().hex[:12],
            "SCALEOUT_LIMITED_KEYS": LIMITED_KEY,
        }
        logs = [directory / f"replica-{index}.log" for index in range(REPLICAS)]
        replicas = [stack.enter_context(gateway_process(env, log)) for log in logs]
        backends = [replica.url.removeprefix("http://") for replica in replicas]
        url = stack.enter_context(nginx_round_robin(backends))
        yield Deployment(url, fake, logs)


def edit(url: str, key: str) -> tuple[str, Any]:
    client = sdk_client(url, key=key)
    raw = client.images.with_raw_response.edit(
        image=("a.png", images.png(32, 32), "image/png"), prompt="x"
    )
    return raw.headers[REPLICA_HEADER], raw.parse()


def test_replicas_behind_nginx_share_a_key_cooldown(deployment: Deployment) -> None:
    fake = deployment.upstream
    fake.by_key[UPSTREAM_KEYS[0]] = Reply(
        status=429,
        body={"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}},
        headers={"retry-after": "30"},
    )
    served_by = []
    for _ in range(3 * REPLICAS):
        replica, result = edit(deployment.url, CLIENT_KEY)
        assert result.data
        served_by.append(replica)
    assert len(set(served_by)) == REPLICAS  # nginx spread the edits over all three
    # Each replica would try the first key once on its own; the shared cooldown allows one try.
    assert fake.edits_with(UPSTREAM_KEYS[0]) == 1
    assert fake.edits_with(UPSTREAM_KEYS[1]) == 3 * REPLICAS
    for log in deployment.logs:
        text = log.read_text()
        assert not any(key in text for key in UPSTREAM_KEYS)


def test_replicas_behind_nginx_share_a_client_rate_limit(deployment: Deployment) -> None:
    deployment.upstream.by_key.clear()
    answered: list[str] = []
    refused: list[openai.RateLimitError] = []
    for _ in range(3 * REPLICAS):
        try:
            replica, _result = edit(deployment.url, LIMITED_KEY)
            answered.append(replica)
        except openai.RateLimitError as exc:
            refused.append(exc)
    # Per replica, 4 a minute would let all 9 through; together they admit exactly 4.
    assert len(answered) == REQUESTS_PER_MINUTE
    assert len(refused) == 3 * REPLICAS - REQUESTS_PER_MINUTE
    refusing = {exc.response.headers[REPLICA_HEADER] for exc in refused}
    assert len(set(answered) | refusing) == REPLICAS
    assert all(exc.code == "rate_limit_exceeded" for exc in refused)
