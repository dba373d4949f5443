"""Send a validated edit to the upstream that serves its model, with a key from that upstream."""

from __future__ import annotations

import asyncio
import time

from app.edit import EditRequest
from app.errors import GatewayError, Overloaded
from app.keys import RoundRobinKeys
from app.metrics import GatewayMetrics
from app.request_record import current_record
from app.upstream.base import Upstream, UpstreamAnswer, UpstreamKey


class Forwarder:
    def __init__(
        self,
        upstreams: dict[str, Upstream],
        keys: dict[str, RoundRobinKeys],
        *,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self._upstreams = upstreams
        self._keys = keys
        self._metrics = metrics if metrics is not None else GatewayMetrics(models=())

    async def edit(self, edit: EditRequest) -> tuple[UpstreamAnswer, str]:
        """The upstream's answer and the name of the upstream that gave it."""
        for name in edit.model.upstreams:
            upstream = self._upstreams.get(name)
            if upstream is not None:
                return await self._attempt(upstream, edit, self._keys[name].next()), name
        raise Overloaded(f"No upstream is configured to serve {edit.model.name}.")

    async def _attempt(
        self, upstream: Upstream, edit: EditRequest, key: UpstreamKey | None
    ) -> UpstreamAnswer:
        """One call to one upstream with one key, timed and counted whatever its outcome."""
        current_record().note_attempt(upstream.name, key.id if key is not None else None)
        start = time.perf_counter()
        outcome = "ok"
        try:
            return await upstream.edit(edit, key)
        except GatewayError as exc:
            outcome = exc.failure or "bad_response"
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"  # the client left or shutdown ran out of time, not the upstream
            raise
        finally:
            self._metrics.record_upstream(
                upstream.name, edit.model.name, outcome, time.perf_counter() - start
            )
