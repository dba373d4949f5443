"""Issue 6, acceptance 3: 64 hostile clients for 30 s while a well-formed client keeps editing.

    python -m tests.bench.hostile [--clients 64] [--seconds 30] [--idle-timeout 3]

Starts the fake upstream and the gateway (`image-gateway serve`: uvloop + httptools) as their own
processes and the hostile clients in a third, so the measuring client (the real OpenAI SDK) shares
no event loop or GIL with the load. It reports the well-formed edit's latency before, during and
after the storm, what the hostile clients got (any 5xx is a failure), and the gateway's memory and
open spool files before and after. A benchmark: it measures, it does not assert timings.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import yaml
from openai import OpenAI

from tests.hardening import multipart as mp
from tests.support import images
from tests.support.servers import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
CLIENT_KEY = "igw-bench-hostile-client-0123456789"
UPSTREAM_KEY = "sk-bench-hostile-upstream-0123456789"


# ---- the hostile clients (run in their own process) -------------------------------------------


def _hostile_bodies() -> list[tuple[str, bytes, str]]:
    from app.config.catalog import load_catalog
    from tests.hardening.corpus import build

    catalog = load_catalog(REPO / "config" / "models.yaml", known_upstreams={"default"})
    return [
        (case.id, case.body, case.content_type or "")
        for case in build(catalog)
        if case.chunks is None and case.limits == "default"
    ]


async def _exchange(host: str, port: int, data: bytes, timeout: float) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            status_line = await reader.readline()
        parts = status_line.split()
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    finally:
        writer.close()


def _request(target: str, body: bytes, content_type: str, key: str = CLIENT_KEY) -> bytes:
    head = (
        f"POST {target} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


async def _hostile_client(
    host: str, port: int, deadline: float, bodies: list[tuple[str, bytes, str]], seed: int
) -> Counter[str]:
    rng = random.Random(seed)
    outcomes: Counter[str] = Counter()
    upload = mp.encode(
        [mp.file("image", images.noise_png(600, 600, seed=seed)), mp.text("prompt", "x")]
    )
    loop = asyncio.get_running_loop()
    while loop.time() < deadline:
        kind = rng.choice(
            ["corpus"] * 6 + ["stall", "disconnect", "bad-key", "garbage", "slowloris"]
        )
        try:
            if kind == "corpus":
                _case, body, content_type = rng.choice(bodies)
                status = await _exchange(
                    host, port, _request("/v1/images/edits", body, content_type), 30
                )
            elif kind == "stall":
                data = _request("/v1/images/edits", upload, mp.content_type())
                status = await _exchange(host, port, data[: len(data) // 3], 60)
            elif kind == "disconnect":
                _reader, writer = await asyncio.open_connection(host, port)
                data = _request("/v1/images/edits", upload, mp.content_type())
                writer.write(data[: len(data) // 2])
                await writer.drain()
                writer.transport.abort()
                status = -1
            elif kind == "bad-key":
                data = _request("/v1/images/edits", upload, mp.content_type(), key="igw-wrong")
                status = await _exchange(host, port, data, 30)
            elif kind == "garbage":
                status = await _exchange(host, port, rng.randbytes(rng.randint(1, 4096)), 30)
            else:  # partial request headers, then silence, then give up
                _reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"POST /v1/images/edits HTTP/1.1\r\nHost: gw\r\nX-Slow: ")
                await writer.drain()
                await asyncio.sleep(min(5.0, max(0.0, deadline - loop.time())))
                writer.close()
                status = -1
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            outcomes[f"{kind}: {type(exc).__name__}"] += 1
            continue
        label = "hung up" if status == -1 else f"{status // 100}xx" if status else "no status"
        outcomes[f"{kind}: {label}"] += 1
        if status >= 500:
            outcomes["5xx"] += 1
    return outcomes


async def _storm(url: str, clients: int, seconds: float, first_seed: int) -> Counter[str]:
    host, port = url.removeprefix("http://").split(":")
    bodies = _hostile_bodies()
    deadline = asyncio.get_running_loop().time() + seconds
    results = await asyncio.gather(
        *(
            _hostile_client(host, int(port), deadline, bodies, seed + first_seed)
            for seed in range(clients)
        )
    )
    total: Counter[str] = Counter()
    for result in results:
        total.update(result)
    return total


# ---- processes ----------------------------------------------------------------------------------


def _serve_upstream(port: int) -> None:
    import uvicorn

    from tests.fakes.openai_upstream import FakeOpenAIUpstream

    uvicorn.run(FakeOpenAIUpstream().app, host="127.0.0.1", port=port, log_level="warning")


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _open_fds(pid: int, spool_dir: Path) -> tuple[int, int]:
    total = spooled = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        total += 1
        try:
            if os.readlink(fd).startswith(str(spool_dir)):
                spooled += 1
        except OSError:
            continue
    return total, spooled


class Measurer:
    """The well-formed client: the OpenAI SDK editing one ~800 KB image again and again."""

    def __init__(self, url: str) -> None:
        self.client = OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
        self.image = images.noise_png(512, 512, seed=99)

    def one(self) -> tuple[float, str]:
        start = time.perf_counter()
        try:
            self.client.images.edit(image=("a.png", self.image, "image/png"), prompt="bench")
            outcome = "ok"
        except Exception as exc:  # counted, not raised: a failure is a figure here
            outcome = type(exc).__name__
        return time.perf_counter() - start, outcome

    def run_for(self, seconds: float, pause: float = 0.05) -> tuple[list[float], Counter[str]]:
        latencies: list[float] = []
        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            latency, outcome = self.one()
            outcomes[outcome] += 1
            if outcome == "ok":
                latencies.append(latency)
            time.sleep(pause)
        return latencies, outcomes


def _summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"count": 0}
    ordered = sorted(latencies)
    return {
        "count": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 1),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


def _one_storm(
    url: str,
    pid: int,
    spool_dir: Path,
    measurer: Measurer,
    clients: int,
    seconds: float,
    processes: list[subprocess.Popen[bytes]],
    first_seed: int,
) -> dict[str, Any]:
    """One storm: the well-formed edit measured throughout, then memory and files as it settles."""
    peak = [_rss_bytes(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], _rss_bytes(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    storm = subprocess.Popen(
        [sys.executable, "-m", "tests.bench.hostile", "--storm", url,
         "--clients", str(clients), "--seconds", str(seconds), "--first-seed", str(first_seed)],
        cwd=REPO, stdout=subprocess.PIPE,
    )  # fmt: skip
    processes.append(storm)
    time.sleep(1)  # let the storm build up before measuring
    during, during_outcomes = measurer.run_for(seconds - 2)
    storm_out, _ = storm.communicate(timeout=seconds + 120)
    stop.set()
    sampler.join()
    settle: list[dict[str, float]] = []
    for wait in (2, 5, 10):
        time.sleep(wait - (settle[-1]["after_s"] if settle else 0))
        fds, spooled = _open_fds(pid, spool_dir)
        settle.append(
            {"after_s": wait, "rss_mib": round(_rss_bytes(pid) / 2**20, 1),
             "open_fds": fds, "spool_fds": spooled}
        )  # fmt: skip
    return {
        "edit_during": {**_summary(during), "outcomes": dict(during_outcomes)},
        "hostile": json.loads(storm_out.decode().strip().splitlines()[-1]),
        "rss_peak_mib": round(peak[0] / 2**20, 1),
        "settle": settle,
    }


def run(
    clients: int,
    seconds: float,
    idle_timeout: float,
    rounds: int = 1,
    gateway_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="gw-bench-hostile-") as tmp:
        workdir = Path(tmp)
        spool_dir = workdir / "spool"
        spool_dir.mkdir()
        upstream_port, gateway_port = free_port(), free_port()
        config = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
        config["catalog"] = str(REPO / "config" / config.get("catalog", "models.yaml"))
        config.setdefault("limits", {}).update(
            {"spool_dir": str(spool_dir), "body_idle_timeout": idle_timeout}
        )
        (workdir / "gateway.yaml").write_text(yaml.safe_dump(config))
        env = {
            **os.environ,
            "GATEWAY_CONFIG": str(workdir / "gateway.yaml"),
            "GATEWAY_UPSTREAM_URL": f"http://127.0.0.1:{upstream_port}/v1",
            "GATEWAY_UPSTREAM_KEYS": UPSTREAM_KEY,
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
            **(gateway_env or {}),
        }
        log_path = workdir / "gateway.log"
        processes: list[subprocess.Popen[bytes]] = []
        try:
            processes.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tests.bench.hostile",
                        "--serve-upstream",
                        str(upstream_port),
                    ],
                    cwd=REPO,
                )
            )
            with log_path.open("wb") as log:
                gateway = subprocess.Popen(
                    [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1",
                     "--port", str(gateway_port)],
                    cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
            processes.append(gateway)
            wait_for_port(upstream_port)
            wait_for_port(gateway_port)
            url = f"http://127.0.0.1:{gateway_port}"
            measurer = Measurer(url)
            measurer.run_for(3)  # warm up
            before, before_outcomes = measurer.run_for(10)
            rss_baseline = _rss_bytes(gateway.pid)

            storms = [
                _one_storm(
                    url, gateway.pid, spool_dir, measurer, clients, seconds, processes, n * clients
                )
                for n in range(rounds)
            ]
            after, after_outcomes = measurer.run_for(10)
            health = httpx.get(url + "/healthz", timeout=10).status_code
            log_text = log_path.read_text(errors="replace")
        finally:
            for process in reversed(processes):
                if process.poll() is None:
                    process.terminate()
                    try:
                        process.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        process.kill()
        return {
            "gateway_env": gateway_env or {},
            "clients": clients,
            "seconds": seconds,
            "body_idle_timeout": idle_timeout,
            "edit_before": {**_summary(before), "outcomes": dict(before_outcomes)},
            "edit_after": {**_summary(after), "outcomes": dict(after_outcomes)},
            "rss_baseline_mib": round(rss_baseline / 2**20, 1),
            "storms": storms,
            "healthz_after": health,
            "tracebacks_in_gateway_log": log_text.count("Traceback (most recent call last)"),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.hostile", description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument(
        "--idle-timeout", type=float, default=3.0,
        help="the gateway's body_idle_timeout for the run (stalled bodies are cut off after it)",
    )  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=1, help="storms in a row (memory creep shows as a trend)"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway process only (e.g. MALLOC_MMAP_THRESHOLD_=131072)",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--storm", help=argparse.SUPPRESS)
    parser.add_argument("--first-seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        _serve_upstream(args.serve_upstream)
        return 0
    if args.storm:
        outcomes = asyncio.run(_storm(args.storm, args.clients, args.seconds, args.first_seed))
        print(json.dumps(dict(sorted(outcomes.items()))))
        return 0
    gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
    figures = run(args.clients, args.seconds, args.idle_timeout, args.rounds, gateway_env)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
