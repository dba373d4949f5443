"""Run ASGI apps on real loopback ports for tests, each in its own thread and event loop."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from app.server.protocol import GuardedHttpToolsProtocol


class _Server(uvicorn.Server):
    """uvicorn's server, noticing `should_exit` within 10 ms instead of 100 ms.

    Tests start and stop hundreds of these, and uvicorn's main loop only looks at the flag every
    tenth of a second. The date header still updates once a second.
    """

    async def main_loop(self) -> None:
        ticks = 0
        should_exit = await self.on_tick(0)
        while not should_exit:
            ticks = (ticks + 1) % 100
            await asyncio.sleep(0.01)
            # on_tick refreshes the date header when given a multiple of 10.
            should_exit = await self.on_tick(0 if ticks == 0 else 1)


def free_port() -> int:
    """A port free at the moment of asking, for a server in another process. Another process
    may take it before that server binds it: in-process servers bind port 0 instead."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bound_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


@contextmanager
def serve_in_thread(
    app: Any, *, port: int | None = None, host: str = "127.0.0.1", **config: Any
) -> Iterator[str]:
    """Serve `app` on `host` (127.0.0.1 unless a test network namespace has others) until the
    block exits; yields its base URL.

    The listening socket is bound here (to `port`, else to one the kernel picks) and handed to
    uvicorn, so no other test process can take the port between choosing and binding it.
    """
    sock = _bound_socket(host, port or 0)
    port = int(sock.getsockname()[1])
    server = _Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
            # The HTTP protocol the CLI serves with, so every test goes through it.
            **{"loop": "asyncio", "http": GuardedHttpToolsProtocol, **config},
        )
    )
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {port} did not start")
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()  # uvicorn closes it on shutdown; not if it never started


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port} after {timeout}s")
