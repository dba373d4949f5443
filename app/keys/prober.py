"""The recovery prober: re-checks disabled keys with a free call and brings them back by itself.

A key disabled by 401/403/402/insufficient_quota is probed every `probe_interval` seconds
(`GET {base}/models` for the OpenAI dialect, never a paid call). An upstream whose dialect has no
probe gets a trial instead: the key is re-enabled and the next real request is its test.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from app.keys.pool import KeyPool
from app.upstream.base import Probeable, Upstream

log = logging.getLogger("gateway.keys")


class Prober:
    def __init__(
        self, pool: KeyPool, upstreams: Mapping[str, Upstream], *, tick: float = 1.0
    ) -> None:
        self._pool = pool
        self._upstreams = upstreams
        # How often due probes are looked for; the probe interval itself is in the key's state.
        self._tick = tick
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="key-prober")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.probe_due()
            except Exception:
                # One bad round (Redis hiccup, a bug) must not end recovery for good.
                log.exception("key probe round failed")
            await asyncio.sleep(self._tick)

    async def probe_due(self) -> int:
        """Probe every disabled key that is due; returns how many came back."""
        recovered = 0
        for name in self._pool.upstream_names():
            upstream = self._upstreams.get(name)
            if upstream is None:
                continue
            for key in await self._pool.claim_probes(name):
                if isinstance(upstream, Probeable):
                    passed = await upstream.probe(key)
                else:
                    passed = True
                await self._pool.report_probe(name, key.id, passed)
                if passed:
                    recovered += 1
                    log.warning("upstream key %s is usable again (probe passed)", key.id)
        return recovered
