"""Load generators: wrk (Debian's package) driven by a Lua script, and an asyncio + httptools
client for runs wrk cannot describe (per-status latency, honouring retry-after) or where wrk is
missing. Both replay one prebuilt multipart request over keep-alive connections.

Run the Python one alone: `python -m tests.bench.load --url ... --body-file ... --connections 16`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from tests.bench.upstream import _apt_install

EDIT_PATH = "/images/edits"


@dataclass
class EditBody:
    """One multipart edit request as the OpenAI SDK would send it, written to a file for wrk."""

    content_type: str
    path: Path
    size: int

    @staticmethod
    def build(images: list[bytes], workdir: Path, name: str, prompt: str = "bench") -> EditBody:
        boundary = "bench-" + secrets.token_hex(8)
        dash = b"--" + boundary.encode()
        field_name = "image" if len(images) == 1 else "image[]"
        parts = [
            dash + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\ngpt-image-1.5\r\n',
            dash
            + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n'
            + prompt.encode()
            + b"\r\n",
        ]
        for index, image in enumerate(images):
            parts.append(
                dash
                + b'\r\nContent-Disposition: form-data; name="'
                + field_name.encode()
                + b'"; filename="photo'
                + str(index).encode()
                + b'.png"\r\n'
                + b"Content-Type: image/png\r\n\r\n"
                + image
                + b"\r\n"
            )
        parts.append(dash + b"--\r\n")
        body = b"".join(parts)
        path = workdir / f"{name}.body"
        path.write_bytes(body)
        return EditBody(f"multipart/form-data; boundary={boundary}", path, len(body))


@dataclass
class LoadResult:
    tool: str
    connections: int
    duration_s: float
    requests: int  # completed, whatever the status
    ok: int  # 2xx
    refused: int  # 503 from admission control
    failures: dict[str, int] = field(default_factory=dict)  # anything else, by kind
    p50_ms: float | None = None  # of 2xx answers (wrk: of all answers)
    p99_ms: float | None = None
    max_ms: float | None = None
    headers_seen: dict[str, str] = field(default_factory=dict)
    steady_p99_ms: float | None = None  # python generator: p99 after the warm-up

    @property
    def rps(self) -> float:
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["rps"] = self.rps
        return out


def wrk_binary(install: bool = True) -> str | None:
    if install and not shutil.which("wrk"):
        _apt_install("wrk")
    return shutil.which("wrk")


_WRK_SCRIPT = """
wrk.method = "POST"
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_CLIENT_KEY")
local cache_control = os.getenv("BENCH_CACHE_CONTROL")
if cache_control and cache_control ~= "" then
  wrk.headers["Cache-Control"] = cache_control
end

done = function(summary, latency, requests)
  local e = summary.errors
  local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
  out:close()
end
"""


def run_wrk(
    url: str, body: EditBody, *, connections: int, duration: float, client_key: str
) -> LoadResult:
    wrk = wrk_binary()
    assert wrk is not None
    with tempfile.TemporaryDirectory(prefix="gw-bench-wrk-") as tmp:
        script = Path(tmp) / "edit.lua"
        script.write_text(_WRK_SCRIPT)
        out = Path(tmp) / "out.json"
        env = {
            **os.environ,
            "BENCH_BODY": str(body.path),
            "BENCH_CONTENT_TYPE": body.content_type,
            "BENCH_CLIENT_KEY": client_key,
            "BENCH_OUT": str(out),
        }
        threads = min(2, connections)
        subprocess.run(
            [
                wrk,
                "-t",
                str(threads),
                "-c",
                str(connections),
                "-d",
                f"{duration:g}s",
                "--timeout",
                "30s",
                "-s",
                str(script),
                url + EDIT_PATH,
            ],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
            timeout=duration + 120,
        )
        raw = json.loads(out.read_text())
    failures = {
        kind: raw[kind] for kind in ("connect", "read", "write", "status", "timeout") if raw[kind]
    }
    completed = raw["requests"]
    return LoadResult(
        tool="wrk",
        connections=connections,
        duration_s=raw["duration_us"] / 1e6,
        requests=completed,
        ok=completed - raw["status"],
        refused=0,
        failures=failures,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
    )


def run_python(
    url: str,
    body: EditBody,
    *,
    connections: int,
    duration: float,
    client_key: str,
    requests_per_connection: int | None = None,
    honour_retry_after: bool = False,
    warmup: float = 0.0,
) -> LoadResult:
    """The asyncio load generator, in its own process so it never shares the bench's GIL."""
    command = [
        sys.executable,
        "-m",
        "tests.bench.load",
        "--url",
        url,
        "--body-file",
        str(body.path),
        "--content-type",
        body.content_type,
        "--connections",
        str(connections),
        "--duration",
        str(duration),
    ]
    if requests_per_connection is not None:
        command += ["--requests-per-connection", str(requests_per_connection)]
    if honour_retry_after:
        command.append("--honour-retry-after")
    command += ["--warmup", str(warmup)]
    env = {**os.environ, "BENCH_CLIENT_KEY": client_key}
    done = subprocess.run(command, check=True, env=env, capture_output=True, timeout=duration + 600)
    raw = json.loads(done.stdout)
    return LoadResult(**raw)


# --- the asyncio load generator ------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[int, dict[str, str], bool]] | None = None
        self._headers: dict[str, str] = {}
        self._name = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except Exception as exc:
            self._fail(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_message_complete(self) -> None:
        status = self._parser.get_status_code()
        keep_alive = self._parser.should_keep_alive()
        headers, self._headers = self._headers, {}
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((status, headers, keep_alive))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(exc or ConnectionResetError("connection closed"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)


def _percentile(sorted_values: list[float], fraction: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


async def _drive(args: argparse.Namespace) -> LoadResult:
    target = urlsplit(args.url)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    body = Path(args.body_file).read_bytes()
    # Sent on every request when set (BENCH_CACHE_CONTROL: the cache-miss scenario's no-cache).
    cache_control = os.environ.get("BENCH_CACHE_CONTROL", "")
    head = (
        f"POST {target.path}{EDIT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {os.environ['BENCH_CLIENT_KEY']}\r\n"
        + (f"Cache-Control: {cache_control}\r\n" if cache_control else "")
        + f"Content-Type: {args.content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    request = head + body  # one shared copy; every connection writes the same object
    del body
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    steady: list[float] = []  # of requests started after --warmup seconds
    failures: dict[str, int] = {}
    counts = {"requests": 0, "ok": 0, "refused": 0}
    seen: dict[str, str] = {}
    start = time.perf_counter()
    deadline = start + args.duration

    async def client() -> None:
        connection: _Connection | None = None
        sent = 0
        while time.perf_counter() < deadline and (
            args.requests_per_connection is None or sent < args.requests_per_connection
        ):
            if connection is None or connection.transport is None:
                try:
                    _, protocol = await loop.create_connection(_Connection, host, port)
                except OSError:
                    failures["connect"] = failures.get("connect", 0) + 1
                    await asyncio.sleep(0.05)
                    continue
                connection = cast(_Connection, protocol)
            connection.waiter = loop.create_future()
            began = time.perf_counter()
            assert connection.transport is not None
            connection.transport.write(request)
            sent += 1
            try:
                status, headers, keep_alive = await asyncio.wait_for(connection.waiter, 60)
            except (OSError, TimeoutError) as exc:
                kind = "timeout" if isinstance(exc, TimeoutError) else "read"
                failures[kind] = failures.get(kind, 0) + 1
                if connection.transport is not None:
                    connection.transport.close()
                connection = None
                continue
            elapsed = time.perf_counter() - began
            counts["requests"] += 1
            for name in ("x-cache", "retry-after"):
                if name in headers:
                    seen[name] = headers[name]
            if 200 <= status < 300:
                counts["ok"] += 1
                latencies.append(elapsed)
                if began - start >= args.warmup:
                    steady.append(elapsed)
            elif status == 503 and "retry-after" in headers:
                counts["refused"] += 1
                if args.honour_retry_after:
                    await asyncio.sleep(min(float(headers["retry-after"]), 60.0))
            else:
                failures[f"status {status}"] = failures.get(f"status {status}", 0) + 1
            if not keep_alive and connection.transport is not None:
                connection.transport.close()
                connection = None
        if connection is not None and connection.transport is not None:
            connection.transport.close()

    await asyncio.gather(*(client() for _ in range(args.connections)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    steady.sort()

    def ms(value: float | None) -> float | None:
        return None if value is None else value * 1000

    return LoadResult(
        tool="python",
        connections=args.connections,
        duration_s=elapsed,
        requests=counts["requests"],
        ok=counts["ok"],
        refused=counts["refused"],
        failures=failures,
        p50_ms=ms(_percentile(latencies, 0.50)),
        p99_ms=ms(_percentile(latencies, 0.99)),
        max_ms=ms(latencies[-1] if latencies else None),
        steady_p99_ms=ms(_percentile(steady, 0.99)),
        headers_seen=seen,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--body-file", required=True)
    parser.add_argument("--content-type", required=True)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--requests-per-connection", type=int, default=None)
    parser.add_argument("--honour-retry-after", action="store_true")
    parser.add_argument("--warmup", type=float, default=0.0, help="seconds before steady state")
    args = parser.parse_args()
    import uvloop

    result = uvloop.run(_drive(args))
    fields = asdict(result)
    json.dump(fields, sys.stdout)


if __name__ == "__main__":
    main()
