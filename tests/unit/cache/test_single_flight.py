"""Unit and integration: the single-flight lease on every way out of a leader.

Two EditCaches sharing one store stand for two gateway replicas. Each exit path of the request
paying upstream (an upstream error, Redis marked down, cancellation, a call past its deadline)
must hand the edit on: the lease is given back, or lapses within one lease, and a waiting
request elsewhere takes over instead of waiting for nothing.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import shutil
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from app.cache.fingerprint import fingerprint
from app.cache.service import EditCache, EditOutcome, Forward
from app.cache.store import (
    CacheStore,
    HostedFile,
    Lookup,
    MemoryStore,
    RedisStore,
    lock_key,
)
from app.config.settings import CacheConfig
from app.errors import UpstreamFailed
from app.intake.request import EditRequest
from app.routing.forwarder import AttemptNote
from app.shared_state.factory import open_redis
from app.upstream.base import PartialSink, UpstreamAnswer
from tests.support import images
from tests.support.redis_server import PrivateRedis
from tests.support.redis_topologies import sync_redis
from tests.unit.cache.builders import edit

RESULT = images.png(8, 8, colour=(4, 5, 6))


class Upstream:
    """A forward function: each call waits for `gate`, then answers or raises `error`."""

    def __init__(self, *, error: Exception | None = None, open_: bool = True) -> None:
        self.calls: list[EditRequest] = []
        self.gate = asyncio.Event()
        if open_:
            self.gate.set()
        self.error = error

    async def __call__(
        self,
        request: EditRequest,
        *,
        on_partial: PartialSink | None = None,
        on_attempt: AttemptNote | None = None,
    ) -> UpstreamAnswer:
        self.calls.append(request)
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        body: dict[str, Any] = {
            "created": 1,
            "data": [{"b64_json": base64.b64encode(RESULT).decode()}],
        }
        return UpstreamAnswer(body=body, request_id="req_up")


async def _no_fetch(url: str) -> bytes:
    raise AssertionError("nothing to fetch")


def replica(
    store: CacheStore,
    upstream: Forward,
    *,
    call_seconds: float = 60.0,
    **config: Any,
) -> EditCache:
    return EditCache(
        store=store,
        forward=upstream,
        fetch=_no_fetch,
        config=CacheConfig(**config),
        call_seconds=lambda _: call_seconds,
    )


def run(service: EditCache, request: EditRequest) -> asyncio.Task[EditOutcome]:
    return asyncio.create_task(
        service.run(request, release=lambda: None, policy="normal", client_scope=None)
    )


def unique_edit() -> tuple[EditRequest, str]:
    request = edit({"prompt": "single-flight " + uuid.uuid4().hex})
    return request, fingerprint(request, scope=None)


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def redis_store(url: str, *, timeout: float = 1.0, retry_after: float = 0.0) -> RedisStore:
    return RedisStore(open_redis(url, timeout=timeout), timeout=timeout, retry_after=retry_after)


LEASE = 2.0


def test_single_flight_lease_is_renewed_while_the_call_runs_and_freed_by_an_upstream_error(
    redis_url: str,
) -> None:
    async def scenario() -> None:
        request, key = unique_edit()
        failing = Upstream(error=UpstreamFailed("upstream answered 500"), open_=False)
        healthy = Upstream()
        # Renewed every third of its 2 s: a busy machine may delay a beat by a second and the
        # lease still holds (a 0.3 s lease lost to a 0.2 s stall made this test flaky).
        first = replica(redis_store(redis_url), failing, lease_seconds=LEASE)
        second = replica(redis_store(redis_url), healthy, lease_seconds=LEASE)
        inspect = sync_redis(redis_url)

        leader = run(first, request)
        await until(lambda: bool(failing.calls))
        follower = run(second, request)
        # Longer than the lease: the leader's heartbeat keeps it alive (its time to live goes
        # back up), so the follower waits instead of paying a second time.
        ttls = []
        for _ in range(25):
            await asyncio.sleep(0.1)
            ttls.append(inspect.pttl(lock_key(key)))
        assert not healthy.calls
        assert all(0 < ttl <= LEASE * 1000 for ttl in ttls), ttls
        assert any(later > earlier for earlier, later in itertools.pairwise(ttls)), ttls

        failing.gate.set()  # the upstream fails: the leader gives the lease back at once
        ended = time.monotonic()
        assert isinstance((await asyncio.gather(leader, return_exceptions=True))[0], UpstreamFailed)
        outcome = await asyncio.wait_for(follower, 5)
        assert time.monotonic() - ended < 1.0  # a poll or two, not a lease (>= 1.3 s)
        assert outcome.x_cache == "miss" and len(healthy.calls) == 1
        assert inspect.exists(lock_key(key)) == 0

    asyncio.run(scenario())


def test_single_flight_leader_gives_its_lease_back_while_redis_is_marked_down() -> None:
    server = PrivateRedis()
    server.start()

    async def scenario() -> None:
        request, key = unique_edit()
        other, _ = unique_edit()
        slow, quick = Upstream(open_=False), Upstream()

        def by_prompt(
            call: EditRequest,
            *,
            on_partial: PartialSink | None = None,
            on_attempt: AttemptNote | None = None,
        ) -> Awaitable[UpstreamAnswer]:
            return slow(call) if call.prompt == request.prompt else quick(call)

        # Marked down for a minute after one failure: longer than the test.
        first = replica(redis_store(server.url, timeout=0.1, retry_after=60), by_prompt)
        healthy = Upstream()
        second = replica(redis_store(server.url, timeout=3.0), healthy)
        admin = redis.Redis(host="127.0.0.1", port=server.port)

        leader = run(first, request)
        await until(lambda: bool(slow.calls))
        # Redis stalls for 0.4 s: another request on the leader's replica times out and marks
        # Redis down there; the leader's own call is still running.
        admin.execute_command("CLIENT", "PAUSE", 400)
        bypassed = await run(first, other)
        assert bypassed.x_cache == "bypass"
        await asyncio.sleep(0.5)
        follower = run(second, request)
        await asyncio.sleep(0.3)
        assert not healthy.calls  # the lease is still held: the follower waits

        slow.gate.set()
        outcome = await asyncio.wait_for(leader, 5)
        assert outcome.x_cache == "miss"
        # The entry could not be written (Redis marked down), but the lease was given back,
        # so the follower takes over instead of waiting out the lease.
        assert admin.exists(lock_key(key)) == 0
        taken_over = await asyncio.wait_for(follower, 3)
        assert taken_over.x_cache == "miss" and len(healthy.calls) == 1

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
        shutil.rmtree(server._dir, ignore_errors=True)


class ReplyInTransit:
    """A store whose lookups are carried out at once but answered only when `deliver` is set:
    a request cancelled in between has taken a lease it never heard of."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.deliver = asyncio.Event()
        self.looked_up = asyncio.Event()

    async def lookup(self, fingerprint: str, *, lead_token: str | None, lease: float) -> Lookup:
        found = await self.inner.lookup(fingerprint, lead_token=lead_token, lease=lease)
        self.looked_up.set()
        await self.deliver.wait()
        return found

    async def renew(self, fingerprint: str, token: str, lease: float) -> bool:
        return await self.inner.renew(fingerprint, token, lease)

    async def release(self, fingerprint: str, token: str) -> None:
        await self.inner.release(fingerprint, token)

    async def put_entry(self, fingerprint: str, meta: bytes, ttl: int) -> None:
        await self.inner.put_entry(fingerprint, meta, ttl)

    async def put_files(self, files: list[tuple[str, str, bytes]], ttl: int) -> None:
        await self.inner.put_files(files, ttl)

    async def get_files(self, files: list[tuple[str, str]]) -> list[bytes | None]:
        return await self.inner.get_files(files)

    async def get_file(self, file_id: str, ext: str) -> HostedFile | None:
        return await self.inner.get_file(file_id, ext)

    async def check(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def test_single_flight_request_cancelled_mid_lookup_gives_back_the_lease_it_took() -> None:
    async def scenario() -> None:
        request, key = unique_edit()
        inner = MemoryStore(max_bytes=1 << 20)
        store = ReplyInTransit(inner)
        upstream = Upstream()
        service = replica(store, upstream)

        waiting = run(service, request)
        await store.looked_up.wait()  # the lease is taken; the answer has not arrived
        waiting.cancel()  # the client left
        await asyncio.gather(waiting, return_exceptions=True)
        await service.aclose(grace=1.0)  # lets the give-back run
        assert not upstream.calls
        # Nobody holds the edit: the next request leads at once.
        assert (await inner.lookup(key, lead_token="next", lease=30)).state == "lead"

    asyncio.run(scenario())


def test_single_flight_leader_cancelled_at_shutdown_gives_its_lease_back(redis_url: str) -> None:
    async def scenario() -> None:
        request, key = unique_edit()
        hanging = Upstream(open_=False)
        service = replica(redis_store(redis_url), hanging)
        inspect = sync_redis(redis_url)

        waiting = run(service, request)
        await until(lambda: bool(hanging.calls))
        assert inspect.exists(lock_key(key)) == 1
        waiting.cancel()  # its client left: the paid call runs on, and keeps its lease
        await asyncio.gather(waiting, return_exceptions=True)
        assert inspect.exists(lock_key(key)) == 1
        await service.aclose(grace=0.1)  # shutdown runs out of patience and cancels the call
        assert inspect.exists(lock_key(key)) == 0

    asyncio.run(scenario())


def test_single_flight_lease_is_not_renewed_past_the_calls_own_deadline(redis_url: str) -> None:
    async def scenario() -> None:
        request, key = unique_edit()
        stuck = Upstream(open_=False)  # a call that overruns its own deadline
        healthy = Upstream()
        # The call may take 0.6 s, so the lease is 0.6 s (not the configured 30 s), renewed
        # until the deadline passes and then left to lapse.
        first = replica(redis_store(redis_url), stuck, call_seconds=0.6)
        second = replica(redis_store(redis_url), healthy, call_seconds=0.6)
        inspect = sync_redis(redis_url)

        run(first, request)
        await until(lambda: bool(stuck.calls))
        began = time.monotonic()
        assert 0 < inspect.pttl(lock_key(key)) <= 600
        outcome = await asyncio.wait_for(run(second, request), 5)
        # The lease lapsed within one lease after the deadline: the follower took over.
        assert time.monotonic() - began < 0.6 + 0.6 + 0.5
        assert outcome.x_cache == "miss" and len(healthy.calls) == 1
        stuck.gate.set()
        await first.aclose(grace=5)

    asyncio.run(scenario())


def test_single_flight_follower_stops_at_once_when_cancelled(redis_url: str) -> None:
    async def scenario() -> None:
        request, key = unique_edit()
        slow = Upstream(open_=False)
        first = replica(redis_store(redis_url), slow)
        second = replica(redis_store(redis_url), Upstream())
        run(first, request)
        await until(lambda: bool(slow.calls))
        follower = run(second, request)
        await asyncio.sleep(0.2)
        follower.cancel()  # its client left
        cancelled = time.monotonic()
        await asyncio.gather(follower, return_exceptions=True)
        assert time.monotonic() - cancelled < 0.1
        assert follower.cancelled()
        slow.gate.set()
        await first.aclose(grace=5)
        # The follower held nothing; the leader stored its entry and let go.
        assert sync_redis(redis_url).exists(lock_key(key)) == 0

    asyncio.run(scenario())


def _stores(redis_url: str) -> list[Callable[[], Awaitable[CacheStore]]]:
    async def memory() -> CacheStore:
        return MemoryStore(max_bytes=1 << 20)

    async def real() -> CacheStore:
        return redis_store(redis_url)

    return [memory, real]


def test_store_renew_extends_its_own_lease_retakes_a_lost_one_and_never_anothers(
    redis_url: str,
) -> None:
    async def scenario() -> None:
        for make in _stores(redis_url):
            store = await make()
            _, key = unique_edit()
            assert (await store.lookup(key, lead_token="mine", lease=30)).state == "lead"
            assert await store.renew(key, "mine", 30)
            await store.release(key, "mine")
            # Lost (a Redis restart): taken again, so followers keep waiting for this call.
            assert await store.renew(key, "mine", 30)
            assert (await store.lookup(key, lead_token="other", lease=30)).state == "wait"
            await store.release(key, "mine")
            assert (await store.lookup(key, lead_token="other", lease=30)).state == "lead"
            assert not await store.renew(key, "mine", 30)  # another request leads now
            # A lookup sent twice (its connection dropped) still leads with its own token.
            assert (await store.lookup(key, lead_token="other", lease=30)).state == "lead"
            await store.release(key, "other")
            await store.aclose()

    asyncio.run(scenario())


def test_single_flight_request_arriving_as_a_failed_call_ends_does_not_spin() -> None:
    """A failed call stays in the flights table until its done-callbacks run. A request that
    arrives in between must not join it: awaiting a finished task raises without yielding, so the
    old loop retried it forever and the callbacks that would have removed it never ran (a worker
    stuck at 100% CPU, deaf to SIGTERM, seen in the soak after a Redis restart)."""

    class FailsOnce:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(
            self,
            request: EditRequest,
            *,
            on_partial: PartialSink | None = None,
            on_attempt: AttemptNote | None = None,
        ) -> UpstreamAnswer:
            self.calls += 1
            if self.calls == 1:
                raise UpstreamFailed("upstream answered 500")
            return await Upstream()(request)

    async def scenario() -> EditOutcome:
        request, _ = unique_edit()
        upstream = FailsOnce()
        service = replica(MemoryStore(max_bytes=1 << 20), upstream)
        ended = asyncio.Event()

        async def late() -> EditOutcome:
            await ended.wait()
            return await service.run(
                request, release=lambda: None, policy="normal", client_scope=None
            )

        arrival = asyncio.create_task(late())
        # The leader's release runs in the paid call's last step: setting the event there wakes
        # `late` before the failed task's done-callbacks, every time.
        leader = service.run(request, release=ended.set, policy="normal", client_scope=None)
        assert isinstance((await asyncio.gather(leader, return_exceptions=True))[0], UpstreamFailed)
        return await arrival

    outcome: list[EditOutcome] = []
    worker = threading.Thread(target=lambda: outcome.append(asyncio.run(scenario())), daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "the late request spun on the failed call"
    assert outcome and outcome[0].x_cache == "miss"
