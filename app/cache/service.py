"""The cache in front of the upstream: lookup, single-flight, spend-safe upstream calls, storing.

Data flow: a validated EditRequest comes in; a CachedEdit (bytes plus metadata) goes out, with
how it was obtained (`x-cache`). The upstream call runs in a task of its own, never cancelled
with the request, so an edit a client stopped waiting for is still paid once, stored, and
handed to the retry. A request waiting for another's call (a follower) holds nothing: it can be
cancelled at any point (its client left) and leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from app.cache.entry import CachedEdit, EntryMeta, FetchImage, from_upstream
from app.cache.fingerprint import fingerprint
from app.cache.lease import Lease
from app.cache.store import CacheStore, MarkedDown
from app.config.settings import CacheConfig
from app.errors import StoreUnavailable
from app.intake.request import EditRequest
from app.routing.forwarder import AttemptNote
from app.upstream.base import PartialSink, UpstreamAnswer
from app.upstream.images_response import normalize_images_response

log = logging.getLogger("gateway.cache")

XCache = Literal["hit", "miss", "bypass"]
# normal: read and write; refresh (no-cache): skip the lookup, write; bypass (no-store): neither.
Policy = Literal["normal", "refresh", "bypass"]

# A follower asks Redis again after these pauses (growing by half each time): an entry stored
# elsewhere is seen within a quarter second, at a few lookups per second per waiting request.
_POLL_FIRST = 0.05
_POLL_MAX = 0.25


class CacheEvents(Protocol):
    """What the cache reports; app.observability.metrics.GatewayMetrics implements it."""

    def record_cache_lookup(self, model: str, result: XCache) -> None:
        """Once per answered request: hit (an entry or a joined call), miss, bypass."""

    def record_cache_store(self, model: str, nbytes: int) -> None: ...

    def record_cache_served(self, model: str, nbytes: int) -> None:
        """Image bytes answered without an upstream call of this request's own."""

    def record_cache_join(self, model: str) -> None: ...

    def record_redis_error(self, component: str) -> None: ...


class CacheCounters:
    """Counts events in memory, for when no metrics are wired (tests, embedding)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def record_cache_lookup(self, model: str, result: XCache) -> None:
        self.counts[result] += 1

    def record_cache_store(self, model: str, nbytes: int) -> None:
        self.counts["stored"] += 1

    def record_cache_served(self, model: str, nbytes: int) -> None:
        self.counts["served_bytes"] += nbytes

    def record_cache_join(self, model: str) -> None:
        self.counts["joined"] += 1

    def record_redis_error(self, component: str) -> None:
        self.counts["error"] += 1


def policy_from_header(cache_control: str | None) -> Policy:
    directives = {
        part.strip().split("=", 1)[0].lower() for part in (cache_control or "").split(",")
    }
    if "no-store" in directives:
        return "bypass"
    if "no-cache" in directives:
        return "refresh"
    return "normal"


@dataclass(frozen=True, slots=True)
class EditOutcome:
    result: CachedEdit
    x_cache: XCache
    age: int
    upstream_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class _Paid:
    result: CachedEdit
    upstream_request_id: str | None


def response_format_of(edit: EditRequest) -> str:
    """What the client asked for, or the model's default (dall-e-2 answers URLs by default)."""
    if edit.response_format is not None:
        return edit.response_format
    rule = edit.model.params.get("response_format")
    return rule.default if rule is not None and isinstance(rule.default, str) else "b64_json"


def for_upstream(edit: EditRequest) -> EditRequest:
    """The edit as sent upstream: bytes wanted back, whatever the client asked for.

    `response_format` goes only to models whose upstream takes it (never to GPT image models,
    which answer 400); upstreams that answer URLs anyway have them downloaded at once.
    """
    params = dict(edit.params)
    if "response_format" in edit.model.params and "response_format" not in edit.model.strip:
        params["response_format"] = "b64_json"
    return replace(edit, params=params, response_format="b64_json")


class Forward(Protocol):
    """The paid upstream call behind the cache (app/routing/forwarder.py). `on_partial` is handed
    each partial image as the upstream streams it, `on_attempt` each attempt's upstream and key."""

    def __call__(
        self,
        edit: EditRequest,
        *,
        on_partial: PartialSink | None,
        on_attempt: AttemptNote | None,
    ) -> Awaitable[UpstreamAnswer]: ...


class EditCache:
    def __init__(
        self,
        *,
        store: CacheStore,
        forward: Forward,
        fetch: FetchImage,
        config: CacheConfig,
        call_seconds: Callable[[EditRequest], float],
        events: CacheEvents | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`call_seconds(edit)`: the longest the upstream call for `edit` may run (every
        attempt, and downloading its result): a leader's lease is never renewed past it."""
        self.store = store
        self.events: CacheEvents = events or CacheCounters()
        self._forward = forward
        self._fetch = fetch
        self._config = config
        self._call_seconds = call_seconds
        self._clock = clock
        self._monotonic = monotonic
        self._flights: dict[str, asyncio.Task[_Paid]] = {}
        self._tasks: set[asyncio.Task[_Paid]] = set()
        self._give_backs: set[asyncio.Task[None]] = set()

    def needs_fingerprint(self, policy: Policy) -> bool:
        """Whether an edit under `policy` is looked up or stored, so its uploads' digests are
        needed (intake hashes them as they arrive only then)."""
        return self._config.enabled and policy != "bypass"

    def ttl_for(self, edit: EditRequest) -> int:
        return self._config.model_ttl_seconds.get(edit.model.name, self._config.ttl_seconds)

    async def run(
        self,
        edit: EditRequest,
        *,
        release: Callable[[], None],
        policy: Policy,
        client_scope: str | None,
        on_partial: PartialSink | None = None,
        on_attempt: AttemptNote | None = None,
    ) -> EditOutcome:
        """Answer `edit`. `release` frees its uploads: called once, when nothing needs them.

        `client_scope` identifies the client for `scope: client` (a digest, never its key).
        `on_partial` and `on_attempt` hear from the upstream call this request pays for (not
        when the answer comes from the cache, or from another request's call).
        """
        caller = _Caller(release, on_partial, on_attempt)
        try:
            outcome = await self._answer(edit, caller, policy, client_scope)
        finally:
            caller.release_unless_handed()
        model = edit.model.name
        self.events.record_cache_lookup(model, outcome.x_cache)
        if outcome.x_cache == "hit":
            self.events.record_cache_served(model, outcome.result.image_bytes)
        return outcome

    async def _answer(
        self, edit: EditRequest, caller: _Caller, policy: Policy, client_scope: str | None
    ) -> EditOutcome:
        if not self.needs_fingerprint(policy):
            paid = await self._pay(edit, caller, key=None)
            return EditOutcome(paid.result, "bypass", 0, paid.upstream_request_id)
        scope = client_scope if self._config.scope == "client" else None
        key = fingerprint(edit, scope=scope)
        if policy == "refresh":
            paid = await self._pay(edit, caller, key=key)
            return EditOutcome(paid.result, "miss", 0, paid.upstream_request_id)
        return await self._lookup_or_pay(edit, caller, key)

    def _lease_seconds(self, edit: EditRequest) -> float:
        """How long a leader's lease on `edit` lasts unless renewed."""
        return min(self._config.lease_seconds, self._call_seconds(edit))

    def _lease(self, edit: EditRequest, key: str, token: str) -> Lease:
        return Lease(
            self.store,
            key,
            token,
            seconds=self._lease_seconds(edit),
            call_deadline=self._monotonic() + self._call_seconds(edit),
            on_store_error=self._store_failed,
            clock=self._monotonic,
        )

    async def _lookup_or_pay(self, edit: EditRequest, caller: _Caller, key: str) -> EditOutcome:
        # Bounds on a follower's wait: the lease it waits on (a leader that stops renewing frees
        # the edit, and the next lookup takes it over), this cap, and its client (the caller
        # cancels the wait when the client leaves or its deadline passes).
        deadline = self._monotonic() + self._config.single_flight_wait_seconds
        pause = _POLL_FIRST
        while True:
            flight = self._flights.get(key)
            # A call that has failed stays here until its done-callbacks run. Awaiting it would
            # raise without yielding, so retrying it would spin and those callbacks never run:
            # a failed call is not shared, the lookup below elects a new leader.
            if flight is not None and flight.done() and not _succeeded(flight):
                flight = None
            if flight is not None:
                try:
                    paid = await asyncio.shield(flight)
                except asyncio.CancelledError:
                    if not flight.cancelled():
                        raise  # this request was cancelled, not the call it waited for
                    continue
                except Exception:  # noqa: S112 - a failed leader does not fail its followers
                    continue
                self.events.record_cache_join(edit.model.name)
                return EditOutcome(paid.result, "hit", 0, None)
            token = secrets.token_hex(16)
            try:
                found = await self.store.lookup(
                    key, lead_token=token, lease=self._lease_seconds(edit)
                )
            except MarkedDown:
                self._store_failed()
                return await self._uncached(edit, caller, key)
            except StoreUnavailable:
                # Redis may have taken the lease for this token after the wait for it ended.
                self._give_back_later(self._lease(edit, key, token))
                self._store_failed()
                return await self._uncached(edit, caller, key)
            except asyncio.CancelledError:
                # The client left while the lookup was under way; it may have made this request
                # the leader, and nobody would pay for (or release) that lease.
                self._give_back_later(self._lease(edit, key, token))
                raise
            if found.state == "hit":
                assert found.meta is not None
                hit = await self._complete(found.meta)
                if hit is not None:
                    age = max(0, int(self._clock() - hit.stored_at))
                    return EditOutcome(hit, "hit", age, None)
                # The entry outlived one of its files (eviction): pay again and rewrite it.
                paid = await self._pay(edit, caller, key=key, flight_key=key)
                return EditOutcome(paid.result, "miss", 0, paid.upstream_request_id)
            if found.state == "lead":
                lease = self._lease(edit, key, token)
                paid = await self._pay(edit, caller, key=key, lease=lease, flight_key=key)
                return EditOutcome(paid.result, "miss", 0, paid.upstream_request_id)
            # Another replica is paying for this edit: wait for its entry, or for its lease to
            # go (a leader that ended without an entry, died, or was lost with a Redis restart),
            # then the next lookup takes over atomically: one request pays again, not each.
            if self._monotonic() >= deadline:
                paid = await self._pay(edit, caller, key=key)
                return EditOutcome(paid.result, "miss", 0, paid.upstream_request_id)
            await asyncio.sleep(min(pause, max(0.0, deadline - self._monotonic())))
            pause = min(pause * 1.5, _POLL_MAX)

    async def _uncached(self, edit: EditRequest, caller: _Caller, key: str) -> EditOutcome:
        """Redis is unavailable: pay without a lease (identical requests in this process still
        join). The result is stored if Redis is back by the time it arrives."""
        paid = await self._pay(edit, caller, key=key, flight_key=key)
        return EditOutcome(paid.result, "bypass", 0, paid.upstream_request_id)

    def _give_back_later(self, lease: Lease) -> None:
        task = asyncio.create_task(lease.give_back(), name="single-flight-give-back")
        self._give_backs.add(task)
        task.add_done_callback(self._give_backs.discard)

    async def _complete(self, meta: EntryMeta) -> CachedEdit | None:
        try:
            blobs = await self.store.get_files([(file_id, ext) for file_id, ext, _ in meta.files])
        except StoreUnavailable:
            self._store_failed()
            return None
        if any(blob is None for blob in blobs):
            return None
        return meta.with_bytes([blob for blob in blobs if blob is not None])

    async def _pay(
        self,
        edit: EditRequest,
        caller: _Caller,
        *,
        key: str | None,
        lease: Lease | None = None,
        flight_key: str | None = None,
    ) -> _Paid:
        """Run the upstream call in its own task (it owns the uploads, and the lease if any,
        from now on) and wait."""
        wants_files = response_format_of(edit) == "url"
        task = asyncio.create_task(
            self._paid_call(
                edit,
                caller.hand_over(),
                key,
                lease,
                wants_files,
                on_partial=caller.on_partial,
                on_attempt=caller.on_attempt,
            ),
            name="upstream-edit",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_retrieve)
        if flight_key is not None:
            self._flights[flight_key] = task
            task.add_done_callback(lambda done: self._forget(flight_key, done))
        # Shielded: a client that disconnects cancels its wait, never the paid call.
        return await asyncio.shield(task)

    def _store_failed(self) -> None:
        if self.store.kind == "redis":
            self.events.record_redis_error("cache")

    def _forget(self, key: str, task: asyncio.Task[_Paid]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]

    async def _paid_call(
        self,
        edit: EditRequest,
        release: Callable[[], None],
        key: str | None,
        lease: Lease | None,
        wants_files: bool,
        *,
        on_partial: PartialSink | None,
        on_attempt: AttemptNote | None,
    ) -> _Paid:
        # The lease is renewed while the call runs and given back however it ends (an answer,
        # an upstream error, Redis unavailable, cancellation at shutdown): after the entry is
        # written, so a follower that finds the lease gone finds the entry.
        held: AbstractAsyncContextManager[None] = (
            lease.held() if lease is not None else contextlib.nullcontext()
        )
        try:
            async with held:
                answer = await self._forward(
                    for_upstream(edit), on_partial=on_partial, on_attempt=on_attempt
                )
                release()  # the uploads are no longer needed once the upstream has answered
                body = normalize_images_response(answer.body)
                result = await from_upstream(body, self._fetch, self._clock())
                result = await self._keep(edit, result, key, wants_files)
                return _Paid(result, answer.request_id)
        finally:
            release()

    async def _keep(
        self, edit: EditRequest, result: CachedEdit, key: str | None, wants_files: bool
    ) -> CachedEdit:
        cacheable = key is not None and result.image_bytes <= int(self._config.max_entry_bytes)
        if not cacheable and not wants_files:
            return result
        ttl = self.ttl_for(edit)
        hosted = replace(
            result,
            images=tuple(
                replace(image, file_id=secrets.token_urlsafe(24)) for image in result.images
            ),
        )
        try:
            await self.store.put_files(
                [(i.file_id or "", i.ext, i.data) for i in hosted.images], ttl
            )
            if cacheable and key is not None:
                await self.store.put_entry(key, hosted.meta(), ttl)
                self.events.record_cache_store(edit.model.name, result.image_bytes)
        except StoreUnavailable:
            self._store_failed()
            return result
        return hosted

    async def aclose(self, grace: float) -> None:
        """Let paid calls in flight finish (they are money spent), within a bound; cancelled
        ones still give their leases back."""
        pending: list[asyncio.Task[Any]] = [*self._tasks, *self._give_backs]
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for task in still:
                task.cancel()
            if still:
                await asyncio.wait(still, timeout=1.0)


class _Caller:
    """One request's side of the upstream call it may pay for: who frees its uploads (the
    request, or the paid call once it takes them over), and who hears from that call."""

    def __init__(
        self,
        release: Callable[[], None],
        on_partial: PartialSink | None,
        on_attempt: AttemptNote | None,
    ) -> None:
        self._release = release
        self.on_partial = on_partial
        self.on_attempt = on_attempt
        self._handed = False
        self._done = False

    def hand_over(self) -> Callable[[], None]:
        self._handed = True
        return self._once

    def release_unless_handed(self) -> None:
        if not self._handed:
            self._once()

    def _once(self) -> None:
        if not self._done:
            self._done = True
            self._release()


def _retrieve(task: asyncio.Task[_Paid]) -> None:
    # A paid call nobody awaits any more (its client left) still logs its failure.
    if not task.cancelled() and task.exception() is not None:
        log.info("upstream edit failed: %s", type(task.exception()).__name__)


def _succeeded(task: asyncio.Task[_Paid]) -> bool:
    return not task.cancelled() and task.exception() is None
