"""Upstream keys: a round-robin over each upstream's configured keys."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pydantic import SecretStr

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

    def next(self) -> UpstreamKey | None:
        """The next key, or None for an upstream that needs none (the demo)."""
        return next(self._cycle) if self._cycle is not None else None
