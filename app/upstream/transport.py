"""The HTTP transport to upstreams: several small connection pools behind one httpx transport.

httpcore's pool (1.0.x) rescans every connection on each request start and end, counting them
quadratically and poll()ing each idle one, so a single pool of a hundred busy connections spends
more CPU managing itself than moving bytes. Requests go to the least busy of several pools of at
most SHARD_CONNECTIONS connections; the configured totals are split between them.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator

import httpx

SHARD_CONNECTIONS = 16


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int,
        max_keepalive_connections: int,
        keepalive_expiry: float,
        shard_connections: int = SHARD_CONNECTIONS,
    ) -> None:
        count = max(1, math.ceil(max_connections / shard_connections))
        limits = httpx.Limits(
            max_connections=math.ceil(max_connections / count),
            max_keepalive_connections=math.ceil(max_keepalive_connections / count),
            keepalive_expiry=keepalive_expiry,
        )
        self._shards = [httpx.AsyncHTTPTransport(limits=limits) for _ in range(count)]
        self._in_flight = [0] * count

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Requests in flight per pool, their bodies not yet closed."""
        return tuple(self._in_flight)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # Ties go to the lowest index, so light traffic reuses a few warm connections.
        index = min(range(len(self._shards)), key=self._in_flight.__getitem__)
        self._in_flight[index] += 1
        try:
            response = await self._shards[index].handle_async_request(request)
        except BaseException:
            self._in_flight[index] -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _Released(response.stream, self._in_flight, index)
        return response

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


class _Released(httpx.AsyncByteStream):
    """A response body that gives its pool's slot back when closed."""

    def __init__(self, stream: httpx.AsyncByteStream, in_flight: list[int], index: int) -> None:
        self._stream = stream
        self._in_flight = in_flight
        self._index: int | None = index

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._index is not None:
                self._in_flight[self._index] -= 1
                self._index = None
