"""The gateway under test as users run it (`image-gateway serve`, uvloop + httptools; one process
unless `workers` says otherwise), and what the benchmark reads about a process from /proc: CPU
seconds, peak RSS, open files, and the same summed over a process and its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.servers import free_port

REPO = Path(__file__).resolve().parents[2]
CLIENT_KEY = "igw-bench-client-key-0123456789abcdef"
UPSTREAM_KEY = "sk-bench-upstream-key-0123456789"


class GatewayProcess:
    def __init__(
        self,
        workdir: Path,
        name: str,
        upstream_url: str,
        *,
        limits: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        workers: int = 1,
        sections: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.name = name
        self.workers = workers
        self.port = free_port()
        self.spool_dir = workdir / f"spool-{name}"
        self.spool_dir.mkdir()
        # The repository's own config, so the bench follows whatever main configures, with the
        # bench's limits on top.
        config = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
        config["catalog"] = str(REPO / "config" / config.get("catalog", "models.yaml"))
        config.setdefault("limits", {}).update({"spool_dir": str(self.spool_dir), **(limits or {})})
        for section, values in (sections or {}).items():
            config.setdefault(section, {}).update(values)
        config_path = workdir / f"gateway-{name}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        self._env = {
            **os.environ,
            "GATEWAY_CONFIG": str(config_path),
            "GATEWAY_UPSTREAM_URL": upstream_url,
            "GATEWAY_UPSTREAM_KEYS": UPSTREAM_KEY,
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
            **(env or {}),
        }
        self._log = workdir / f"gateway-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self._log

    def start(self) -> GatewayProcess:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                str(self.workers),
            ],
            env=self._env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=open(self._log, "wb"),  # noqa: SIM115 - lives as long as the process
        )
        deadline = time.monotonic() + 30
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"gateway exited: {self._log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/healthz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the parent and every worker: a worker whose event loop is stuck outlives both
        SIGTERM and its parent."""
        if self.process is None:
            return
        for pid in reversed(process_tree(self.process.pid)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def spooled_files_open(self) -> int:
        """Spool files the process still holds (unnamed temp files show as `(deleted)`)."""
        count = 0
        fd_dir = Path(f"/proc/{self.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(str(self.spool_dir)):
                count += 1
        return count + len(os.listdir(self.spool_dir))


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it (with --workers: the parent and its workers)."""
    found = [pid]
    for parent in found:
        children = Path(f"/proc/{parent}/task/{parent}/children")
        try:
            found += [int(child) for child in children.read_text().split()]
        except OSError:
            continue  # exited meanwhile
    return found


def tree_rss_bytes(pid: int) -> int:
    return sum(_status_kib(p, "VmRSS") * 1024 for p in process_tree(pid))


def tree_open_fds(pid: int) -> int:
    total = 0
    for p in process_tree(pid):
        try:
            total += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
    return total


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _status_kib(pid: int, key: str) -> int:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return 0  # exited meanwhile
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class PeakRss:
    """Peak resident memory of a process over a block: the kernel's high-water mark (reset via
    clear_refs) where allowed, else sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_bytes = 0
        self._hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            self._hwm_reset = True
        except OSError:
            self._hwm_reset = False
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_bytes = max(self.peak_bytes, _status_kib(self.pid, "VmRSS") * 1024)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._hwm_reset:
            self.peak_bytes = max(self.peak_bytes, _status_kib(self.pid, "VmHWM") * 1024)
