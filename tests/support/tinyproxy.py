"""A real egress proxy for tests: Debian's tinyproxy, installed if missing, run in the foreground
on a free loopback port with its own config and log file."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.debian import ensure_program, on_path
from tests.support.servers import free_port, wait_for_port


def tinyproxy_binary() -> str:
    return ensure_program(on_path("tinyproxy"), "tinyproxy")


@dataclass
class Tinyproxy:
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextmanager
def tinyproxy(
    directory: Path,
    *,
    connect_ports: tuple[int, ...] = (),
    basic_auth: tuple[str, str] | None = None,
) -> Iterator[Tinyproxy]:
    """Tunnels (CONNECT) only to `connect_ports`; with `basic_auth`, only for that user."""
    port = free_port()
    log_path = directory / f"tinyproxy-{port}.log"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 60",
        f'LogFile "{log_path}"',
        "LogLevel Connect",
        "MaxClients 64",
        "Allow 127.0.0.1",
        *(f"ConnectPort {connect_port}" for connect_port in connect_ports),
    ]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    config = directory / f"tinyproxy-{port}.conf"
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [tinyproxy_binary(), "-d", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=15)
        yield Tinyproxy(port, log_path)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
