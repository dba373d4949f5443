"""The one interface every upstream dialect implements, and what it hands back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from pydantic import SecretStr

from app.intake.request import EditRequest


@dataclass(frozen=True, slots=True)
class UpstreamKey:
    id: str  # safe to log and show: "<upstream>#<n>", never derived from the secret
    secret: SecretStr


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    body: dict[str, Any]  # the upstream's ImagesResponse JSON
    request_id: str | None  # the upstream's x-request-id, if it sent one


# Takes each partial image event (`*.partial_image`, b64_json) as a streaming upstream sends it.
PartialSink = Callable[[dict[str, Any]], None]


class Upstream(Protocol):
    name: str

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        """The upstream's answer to `edit`. A dialect that streams hands each partial image to
        `on_partial` as it arrives; one that cannot never calls it."""
        ...


@runtime_checkable
class Probeable(Protocol):
    """A dialect that can check a key for free (no paid call), for the recovery prober."""

    async def probe(self, key: UpstreamKey) -> bool:
        """True when the upstream accepts the key again; False when it still refuses it or the
        answer is inconclusive (the key stays disabled until the next probe)."""
        ...
