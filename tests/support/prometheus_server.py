"""A private Prometheus server for tests: scrapes loopback targets every second, answers PromQL
through its HTTP API, and is stopped (its data directory removed) when the block ends.

Debian's `prometheus` package is the documented way to get the binary; it is installed when
missing, as redis-server is (tests/support/redis_server.py). Only the binary is run: the package's
own service is not started (no init system here), and this one listens on 127.0.0.1 only.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.debian import ensure_program, on_path
from tests.support.servers import free_port

JOB = "image-gateway"  # the job name config/prometheus.yml and the alerts use


def prometheus_binary() -> str:
    return ensure_program(on_path("prometheus"), "prometheus", recommends=False)


@dataclass
class PrometheusServer:
    url: str
    log_path: Path

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result: one {"metric": labels, "value": [t, "v"]} per series."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def scalar(self, expr: str) -> float:
        """The one value `expr` returns now, or NaN when it returns no series."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else float("nan")

    def wait_until(self, expr: str, predicate: Any, timeout: float = 60) -> float:
        """Polls `expr` (one value) until `predicate(value)` holds; returns that value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.scalar(expr)
            if predicate(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} = {value} after {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@contextmanager
def running_prometheus(
    targets: list[str], rule_files: tuple[Path, ...] = ()
) -> Iterator[PrometheusServer]:
    """Prometheus scraping `targets` (host:port, path /metrics) as job `image-gateway` every
    second, evaluating `rule_files` every second."""
    directory = Path(tempfile.mkdtemp(prefix="gw-prometheus-"))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(path) for path in rule_files],
        "scrape_configs": [
            {"job_name": JOB, "metrics_path": "/metrics", "static_configs": [{"targets": targets}]}
        ],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log_path = directory / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=directory,
        )
    server = PrometheusServer(f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"prometheus exited {process.returncode}:\n{server.log()}")
            try:
                if httpx.get(server.url + "/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after 60 s:\n{server.log()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)
