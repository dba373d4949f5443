"""Upstream keys: a round-robin over each upstream's configured keys."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pydantic import SecretStr

from app.metrics import KeySnapshot
from app.upstream.base import UpstreamKey


class RoundRobinKeys:
    def __init__(self, upstream: str, secrets: tuple[SecretStr, ...]) -> None:
        self.keys = tuple(
            UpstreamKey(id=f"{upstream}#{index}", secret=secret)
            for index, secret in enumerate(secrets, start=1)
        )
        self._cycle: Iterator[UpstreamKey] | None = (
            itertools.cycle(self.keys) if self.keys else None
        )

    def snapshots(self) -> list[KeySnapshot]:
        """Every key as the metrics report it: a round-robin has no health, all are healthy."""
        return [
            KeySnapshot(upstream=key.id.partition("#")[0], key_id=key.id, state="healthy")
            for key in self.keys
        ]

    def next(self) -> UpstreamKey | None:
        """The next key, or None for an upstream that needs none (the demo)."""
        return next(self._cycle) if self._cycle is not None else None
