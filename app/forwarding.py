"""Send a validated edit to the upstream that serves its model, with a key from that upstream."""

from __future__ import annotations

from app.edit import EditRequest
from app.errors import Overloaded
from app.keys import RoundRobinKeys
from app.upstream.base import Upstream, UpstreamAnswer


class Forwarder:
    def __init__(self, upstreams: dict[str, Upstream], keys: dict[str, RoundRobinKeys]) -> None:
        self._upstreams = upstreams
        self._keys = keys

    async def edit(self, edit: EditRequest) -> tuple[UpstreamAnswer, str]:
        """The upstream's answer and the name of the upstream that gave it."""
        for name in edit.model.upstreams:
            upstream = self._upstreams.get(name)
            if upstream is not None:
                return await upstream.edit(edit, self._keys[name].next()), name
        raise Overloaded(f"No upstream is configured to serve {edit.model.name}.")
