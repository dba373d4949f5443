"""A loopback upstream that answers with raw bytes, scripted per connection: the hostile or broken
server a well-behaved HTTP library never lets a test be. It counts connections and requests."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

# One connection: the script reads requests with `upstream.read_request(reader)` and writes
# whatever bytes it likes.
Script = Callable[["RawUpstream", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawUpstream:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def posts(self, path: str = "") -> int:
        return sum(1 for head in self.heads if head.startswith(b"POST " + path.encode()))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()
            self._handlers.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request's body (Content-Length or chunked); its head is kept in self.heads as
        soon as it has arrived, before the body."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        lines = head.decode("latin-1").lower().split("\r\n")
        length = next(
            (int(line.split(":")[1]) for line in lines if line.startswith("content-length:")), None
        )
        if length is not None:
            body = await reader.readexactly(length)
        elif any(line.startswith("transfer-encoding:") and "chunked" in line for line in lines):
            pieces = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                pieces.append(await reader.readexactly(size))
                await reader.readexactly(2)
                if size == 0:
                    break
            body = b"".join(pieces)
        else:
            body = b""
        self.bodies.append(body)
        return body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (RST) instead of a clean close (FIN)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def answering(*answers: bytes) -> Script:
    """Each request on a connection gets the next answer (the last one repeats)."""

    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        count = 0
        while True:
            await upstream.read_request(reader)
            writer.write(answers[min(count, len(answers) - 1)])
            await writer.drain()
            count += 1

    return script


@contextmanager
def raw_upstream_in_thread(script: Script) -> Iterator[RawUpstream]:
    """The same server on its own event loop and thread, for tests that block (the SDK)."""
    loop = asyncio.new_event_loop()
    upstream = RawUpstream(script)
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        async with upstream:
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the raw upstream did not start")
    try:
        yield upstream
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
