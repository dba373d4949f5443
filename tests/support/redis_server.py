"""A private redis-server for tests (never the machine's shared one), or GATEWAY_TEST_REDIS_URL."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.debian import ensure_program, on_path
from tests.support.servers import free_port


def redis_binary() -> str:
    # CI machines may lack it; Debian's package is the documented way to get it.
    return ensure_program(on_path("redis-server"), "redis-server")


def spawn_redis(port: int, directory: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            redis_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            directory,
            "--daemonize",
            "no",
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_redis(port: int, process: subprocess.Popen[bytes] | None = None) -> None:
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5).ping()
            return
        except redis.ConnectionError:
            if process is not None and process.poll() is not None:
                raise PortTaken(port) from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class PortTaken(RuntimeError):
    """redis-server exited at once: another process took the port after it was chosen."""


class PrivateRedis:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._dir = tempfile.mkdtemp(prefix="gw-redis-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        self._process = spawn_redis(self.port, self._dir, *extra)
        wait_for_redis(self.port, self._process)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)
            self._process = None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown save, no last AOF flush.
        `start()` again brings it back on the same port and directory."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None

    def remove(self) -> None:
        """Stop it and delete its directory."""
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@contextmanager
def test_redis_url() -> Iterator[tuple[str, PrivateRedis | None]]:
    """The Redis URL tests use, and the server object when it is our own private one.

    GATEWAY_TEST_REDIS_TOPOLOGY=cluster|sentinel runs the same tests against a 3-primary Redis
    Cluster or a Sentinel-watched primary + replica, started here (see redis_topologies.py).
    """
    configured = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if configured:
        yield configured, None
        return
    topology = os.environ.get("GATEWAY_TEST_REDIS_TOPOLOGY", "single")
    if topology != "single":
        from tests.support.redis_topologies import running_topology

        with running_topology(topology) as deployment:
            yield deployment.url, None
        return
    server = PrivateRedis()
    server.start()
    try:
        yield server.url, server
    finally:
        server.stop()
        shutil.rmtree(server._dir, ignore_errors=True)
