"""Run `image-gateway serve` as a real subprocess on a loopback port, its output in a file."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.servers import free_port, wait_for_port


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("image-gateway")
    if script.exists():
        return [str(script)]
    found = shutil.which("image-gateway")
    return [found] if found else [sys.executable, "-m", "app.cli"]


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


@contextmanager
def gateway_process(
    env: dict[str, str], log_path: Path, *, workers: int = 1, extra_args: tuple[str, ...] = ()
) -> Iterator[GatewayProcess]:
    port = free_port()
    full_env = {**os.environ, **env}
    full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                *gateway_command(),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                str(workers),
                *extra_args,
            ],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_for_port(port, timeout=30)
        except RuntimeError:
            process.kill()
            raise RuntimeError("gateway did not start:\n" + log_path.read_text()) from None
        yield GatewayProcess(process, f"http://127.0.0.1:{port}", log_path)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
