"""The single-flight lease a leader holds while it pays upstream for an edit.

Short (cache.lease_seconds, at most the call's own deadline), renewed every third of that while
the call runs and never past its deadline, and given back on every way out of the call. A leader
that dies frees its edit within one lease; one that ends frees it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from app.cache.store import CacheStore
from app.errors import StoreUnavailable


class Lease:
    def __init__(
        self,
        store: CacheStore,
        fingerprint: str,
        token: str,
        *,
        seconds: float,
        call_deadline: float,
        on_store_error: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`seconds`: how long the lease lasts unrenewed; `call_deadline`: when (on `clock`) the
        upstream call it guards has run out of time, after which it is no longer renewed."""
        self.fingerprint = fingerprint
        self.token = token
        self.seconds = seconds
        self._store = store
        self._call_deadline = call_deadline
        self._on_store_error = on_store_error
        self._clock = clock

    @contextlib.asynccontextmanager
    async def held(self) -> AsyncIterator[None]:
        """Keep the lease while the block runs; give it back however the block ends."""
        beat = asyncio.create_task(self._renew(), name="single-flight-lease")
        try:
            yield
        finally:
            beat.cancel()
            # Shielded: a cancelled leader (shutdown) still gives its lease back.
            await asyncio.shield(self.give_back())

    async def give_back(self) -> None:
        """Drop the lease if this token still holds it; never raises."""
        try:
            await self._store.release(self.fingerprint, self.token)
        except StoreUnavailable:
            # Redis is unreachable: the lease lapses by itself within `seconds`.
            self._on_store_error()

    async def _renew(self) -> None:
        interval = self.seconds / 3
        while True:
            await asyncio.sleep(interval)
            if self._clock() >= self._call_deadline:
                return  # the call is past its own deadline: let the lease lapse
            try:
                if not await self._store.renew(self.fingerprint, self.token, self.seconds):
                    return  # another request leads now (this one's lease had lapsed)
            except StoreUnavailable:
                self._on_store_error()  # the next beat, before the lease runs out, tries again
