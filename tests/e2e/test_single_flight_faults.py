"""Acceptance (issue 18, line 1): single-flight that cannot strand anyone.

Two gateway processes (replicas) share a private Redis; the fake upstream answers after a set
latency; the clients are the real OpenAI SDK. Redis is restarted empty in the middle of a burst
of identical and repeated edits; a follower whose client leaves stops waiting at once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
import redis
from openai import OpenAI

from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_env import gateway_env
from tests.support.gateway_process import GatewayProcess, gateway_process
from tests.support.prom import total
from tests.support.redis_server import PrivateRedis
from tests.support.sdk import sdk_client

LATENCY = 1.0  # the fake upstream's answer time, seconds
# Acceptance: every request answers within the upstream's latency + 2 s.
BOUND = LATENCY + 2.0
LEASE = 30.0  # cache.lease_seconds: the default, as operators run it
ROUNDS = 6
RESTART_ROUND = 2
FRESH = 4  # new fingerprints per round
PER_FRESH = 3  # identical edits of each, sent at once (they land on both replicas)
REPEATS = 4  # edits repeating the previous round's fingerprints
CLIENTS = FRESH * PER_FRESH + REPEATS  # 16 concurrent clients


@dataclass
class Replicas:
    redis: PrivateRedis
    gateways: list[GatewayProcess]

    def sdk(self, index: int, **options: Any) -> OpenAI:
        return sdk_client(self.gateways[index].url, **options)

    def in_flight(self, index: int) -> float:
        scrape = httpx.get(self.gateways[index].url + "/metrics", timeout=5)
        return total(scrape.text, "gateway_requests_in_flight")

    def inspect(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=2)


@pytest.fixture(scope="module")
def replicas(
    fake_upstream: FakeOpenAIUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    directory = tmp_path_factory.mktemp("single-flight")
    server = PrivateRedis()
    server.start()
    config = write_gateway_config(
        directory, retry={"max_attempts": 1}, cache={"enabled": True, "lease_seconds": LEASE}
    )
    env = gateway_env(
        fake_upstream.url,
        GATEWAY_CONFIG=str(config),
        GATEWAY_REDIS_URL=server.url,
        GATEWAY_CACHE_ENABLED="true",
        GATEWAY_METRICS_PUBLIC="true",
    )
    try:
        with (
            gateway_process(env, directory / "a.log") as first,
            gateway_process(env, directory / "b.log") as second,
        ):
            yield Replicas(server, [first, second])
    finally:
        server.stop()


def _prompt(tag: str) -> str:
    return f"single-flight {tag} {uuid.uuid4().hex}"


@dataclass
class Answer:
    round: int
    prompt: str
    seconds: float
    x_cache: str | None


class LockWatch:
    """Samples every single-flight lease in Redis while the burst runs: the longest TTL seen."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.longest_ms = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        client = redis.Redis(host="127.0.0.1", port=self._port, socket_timeout=0.5)
        while not self._stop.wait(0.05):
            try:
                for key in client.scan_iter(match="igw:c1:*:lock", count=1000):
                    self.longest_ms = max(self.longest_ms, int(client.pttl(key)))
                self.samples += 1
            except redis.RedisError:
                continue  # Redis is being restarted


def test_redis_restarted_empty_mid_burst_strands_no_request(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    upstream.responder = lambda request: Reply(delay=LATENCY)
    png = images.png(32, 32)
    clients = [replicas.sdk(index % 2) for index in range(CLIENTS)]
    answers: list[Answer] = []
    restart_seconds: list[float] = []

    def send(client: OpenAI, round_: int, prompt: str, start: threading.Barrier) -> Answer:
        start.wait(timeout=30)
        began = time.monotonic()
        raw = client.images.with_raw_response.edit(image=("a.png", png, "image/png"), prompt=prompt)
        raw.parse()
        return Answer(round_, prompt, time.monotonic() - began, raw.headers.get("x-cache"))

    def restart_soon() -> None:
        # The leaders of this round are halfway through their upstream calls.
        time.sleep(LATENCY / 2)
        began = time.monotonic()
        replicas.redis.stop()
        replicas.redis.start()  # same port, empty: no persistence
        restart_seconds.append(time.monotonic() - began)

    previous: list[str] = []
    with LockWatch(replicas.redis.port) as locks, ThreadPoolExecutor(CLIENTS + 1) as pool:
        for round_ in range(ROUNDS):
            fresh = [_prompt(f"r{round_}f{index}") for index in range(FRESH)]
            # Client i sends to replica i % 2: each fingerprint's identical edits land on both.
            prompts = [fresh[index // PER_FRESH] for index in range(FRESH * PER_FRESH)]
            prompts += [(previous or fresh)[index % FRESH] for index in range(REPEATS)]
            start = threading.Barrier(CLIENTS + (1 if round_ == RESTART_ROUND else 0))
            futures = [
                pool.submit(send, clients[index], round_, prompt, start)
                for index, prompt in enumerate(prompts)
            ]
            if round_ == RESTART_ROUND:
                start.wait(timeout=30)
                restart_soon()
            answers += [future.result(timeout=120) for future in futures]
            previous = fresh

    slow = [answer for answer in answers if answer.seconds > BOUND]
    by_round = {
        round_: max(answer.seconds for answer in answers if answer.round == round_)
        for round_ in range(ROUNDS)
    }
    calls = Counter(request.field_map()["prompt"] for request in upstream.edits)
    print(
        f"\nlatency {LATENCY} s, bound {BOUND} s; Redis restart took {restart_seconds[0]:.2f} s; "
        f"slowest per round: {', '.join(f'{s:.2f}' for s in by_round.values())} s; "
        f"x-cache: {dict(Counter(answer.x_cache for answer in answers))}; "
        f"upstream calls: {len(upstream.edits)} for {len(calls)} fingerprints, "
        f"most for one: {max(calls.values())}; longest lease TTL seen: "
        f"{locks.longest_ms} ms over {locks.samples} samples"
    )
    assert len(answers) == ROUNDS * CLIENTS
    assert not slow, [(a.round, round(a.seconds, 2), a.x_cache) for a in slow]
    # No lease lives longer than one lease (never a fixed 630 s)...
    assert 0 < locks.longest_ms <= LEASE * 1000
    # ...and none outlives its leader: once every call has ended, none is left without an entry.
    inspect = replicas.inspect()
    stranded = {
        key: inspect.pttl(key)
        for key in inspect.scan_iter(match="igw:c1:*:lock", count=1000)
        if not inspect.exists(key.replace(b":lock", b":entry"))
    }
    assert all(ttl <= LEASE * 1000 for ttl in stranded.values()), stranded
    assert not stranded, stranded
    # One upstream call per fingerprint across both replicas; around the restart, at most one
    # more (the lease vanished with Redis, so a follower took over, or a follower's lookup
    # failed and it was served uncached).
    for round_ in range(ROUNDS):
        fresh_calls = [
            calls[answer.prompt]
            for answer in answers
            if answer.round == round_ and f" r{round_}f" in answer.prompt
        ]
        near_restart = round_ in (RESTART_ROUND, RESTART_ROUND + 1)
        assert set(fresh_calls) <= ({1, 2} if near_restart else {1}), (round_, fresh_calls)


def _leader_running(
    replicas: Replicas, upstream: FakeOpenAIUpstream, index: int, prompt: str
) -> tuple[threading.Thread, list[Any]]:
    """Start an edit on replica `index` and return once the upstream has it (its lease held)."""
    png = images.png(32, 32)
    answers: list[Any] = []

    def lead() -> None:
        raw = replicas.sdk(index).images.with_raw_response.edit(
            image=("a.png", png, "image/png"), prompt=prompt
        )
        raw.parse()
        answers.append(raw.headers.get("x-cache"))

    thread = threading.Thread(target=lead, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not any(r.field_map().get("prompt") == prompt for r in upstream.edits):
        assert time.monotonic() < deadline, "the leader never reached the upstream"
        time.sleep(0.02)
    return thread, answers


def _wait_for_in_flight(replicas: Replicas, index: int, expected: float, since: float) -> float:
    """Seconds from `since` until replica `index` reports `expected` requests in flight."""
    while replicas.in_flight(index) != expected:
        assert time.monotonic() - since < 10, "the in-flight gauge never came back"
        time.sleep(0.02)
    return time.monotonic() - since


@pytest.mark.parametrize("leader_replica", [1, 0], ids=["leader-elsewhere", "leader-here"])
def test_follower_whose_client_leaves_stops_waiting(
    replicas: Replicas, upstream: FakeOpenAIUpstream, leader_replica: int
) -> None:
    # Replica 0's follower either polls Redis for another replica's lease, or joins the call
    # its own process is making; either way it stops when its client goes.
    upstream.responder = lambda request: Reply(delay=5.0)
    prompt = _prompt("disconnect")
    leader, answers = _leader_running(replicas, upstream, leader_replica, prompt)
    left_behind = 1 if leader_replica == 0 else 0  # the leader's own request, still waiting
    impatient = replicas.sdk(0, timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.images.edit(image=("a.png", images.png(32, 32), "image/png"), prompt=prompt)
    left = time.monotonic()
    seconds = _wait_for_in_flight(replicas, 0, left_behind, left)
    print(f"\nin-flight gauge back to {left_behind} {seconds:.3f} s after the client left")
    assert seconds <= 1.0
    leader.join(timeout=30)
    assert answers == ["miss"]
    assert sum(r.field_map().get("prompt") == prompt for r in upstream.edits) == 1


def test_follower_stops_at_its_clients_read_timeout(
    replicas: Replicas, upstream: FakeOpenAIUpstream
) -> None:
    # A client that stops reading without closing its connection: the SDK's own read timeout
    # (x-stainless-read-timeout) bounds the wait all the same.
    upstream.responder = lambda request: Reply(delay=6.0)
    prompt = _prompt("read-timeout")
    leader, answers = _leader_running(replicas, upstream, 1, prompt)
    began = time.monotonic()
    response = httpx.post(
        replicas.gateways[0].url + "/v1/images/edits",
        headers={"authorization": f"Bearer {CLIENT_KEY}", "x-stainless-read-timeout": "1"},
        files={"image": ("a.png", images.png(32, 32), "image/png")},
        data={"prompt": prompt},
        timeout=30,
    )
    seconds = time.monotonic() - began
    print(f"\nfollower answered after {seconds:.2f} s with a read timeout of 1 s")
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "client_timeout"
    assert seconds < 4.0  # the leader's call takes 6 s
    assert replicas.in_flight(0) == 0
    leader.join(timeout=30)
    assert answers == ["miss"]
