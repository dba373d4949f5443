"""The benchmark: `python -m tests.bench.run` (options: --help).

Starts a fast fake upstream (nginx, else asyncio), a slow one (answers after 2 s), the gateway as
`image-gateway serve` runs it, and drives load (wrk, else the asyncio generator). Every scenario
measures direct-to-upstream and through-gateway in the same run, prints one table and writes JSON
to tests/bench/results/. Add scenarios with `register()`; `--only` picks them by name.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.bench.gateway import CLIENT_KEY, GatewayProcess, PeakRss, cpu_seconds
from tests.bench.load import EditBody, LoadResult, run_python, run_wrk, wrk_binary
from tests.bench.upstream import AsyncioUpstream, Upstream, fast_upstream
from tests.support import images
from tests.support.redis_server import PrivateRedis

RESULTS = Path(__file__).resolve().parent / "results"
MB = 1_000_000

# Limits the bench gateway runs with (on top of config/gateway.yaml): the overload run needs a
# cap below its 256 clients; every other scenario stays under it.
BENCH_LIMITS = {"max_in_flight": 128}
SLOW_UPSTREAM_SECONDS = 2.0
# The overload run starts 256 uploads in the same instant; requests started in this first stretch
# queue behind that herd, so the steady-state p99 is reported apart from the all-requests one.
OVERLOAD_WARMUP_SECONDS = 3.0


@dataclass
class Row:
    scenario: str
    via: str  # "direct" | "gateway"
    connections: int
    rps: float | None = None
    mb_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    errors: int | None = None
    refused_503: int | None = None
    peak_rss_mb: float | None = None
    cpu_ms_per_request: float | None = None
    steady_p99_ms: float | None = None
    note: str = ""


@dataclass
class Measured:
    load: LoadResult
    cpu_ms_per_request: float | None
    peak_rss_mb: float | None


class Bench:
    """Shared state for scenarios: payloads, processes (started on first use), options."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self._bodies: dict[str, EditBody] = {}
        self._upstreams: dict[str, Upstream] = {}
        self._gateways: dict[str, GatewayProcess] = {}
        self._redis: PrivateRedis | None = None
        self.use_wrk = not args.python_load and wrk_binary() is not None
        self.notes: list[str] = []

    # -- payloads --
    def body(self, name: str) -> EditBody:
        if name not in self._bodies:
            count, side = {
                "1x1MB": (1, 577),  # an incompressible RGB PNG of ~1 MB
                "1x12KB": (1, 64),
                "4x5MB": (4, 1291),
                "4x10MB": (4, 1826),
            }[name]
            pngs = [images.noise_png(side, side, seed=i) for i in range(count)]
            self._bodies[name] = EditBody.build(pngs, self.workdir, name)
        return self._bodies[name]

    # -- processes --
    def upstream(self, kind: str) -> Upstream:
        if kind not in self._upstreams:
            if kind == "fast":
                self._upstreams[kind] = fast_upstream(prefer_nginx=not self.args.asyncio_upstream)
            else:
                self._upstreams[kind] = AsyncioUpstream(delay=SLOW_UPSTREAM_SECONDS).start()
        return self._upstreams[kind]

    def gateway(self, name: str) -> GatewayProcess:
        if name not in self._gateways:
            # Forwarding scenarios replay one identical request: with the result cache on, all
            # but the first would be hits, so only the cache scenario's gateway has it.
            env: dict[str, str] = {"GATEWAY_CACHE_ENABLED": "false"}
            if name == "cache":
                env["GATEWAY_CACHE_ENABLED"] = "true"
                if self._redis is None:
                    self._redis = PrivateRedis()
                    self._redis.start()
                env["GATEWAY_REDIS_URL"] = self._redis.url
            upstream = self.upstream("slow" if name == "slow" else "fast")
            self._gateways[name] = GatewayProcess(
                self.workdir, name, upstream.url, limits=BENCH_LIMITS, env=env
            ).start()
        return self._gateways[name]

    def close(self) -> None:
        for gateway in self._gateways.values():
            gateway.stop()
        for upstream in self._upstreams.values():
            upstream.stop()
        if self._redis is not None:
            self._redis.stop()
            shutil.rmtree(self._redis._dir, ignore_errors=True)

    # -- measuring --
    def load(self, url: str, body: EditBody, connections: int, duration: float) -> LoadResult:
        if self.use_wrk:
            return run_wrk(
                url, body, connections=connections, duration=duration, client_key=CLIENT_KEY
            )
        return run_python(
            url, body, connections=connections, duration=duration, client_key=CLIENT_KEY
        )

    def measure(self, url: str, pid: int, body: EditBody, connections: int) -> Measured:
        """Warm up, then `--repeat` runs; the median run by throughput is kept."""
        self.load(url, body, connections, 1.0)
        runs: list[Measured] = []
        for _ in range(self.args.repeat):
            with PeakRss(pid) as peak:
                before = cpu_seconds(pid)
                result = self.load(url, body, connections, self.args.duration)
                spent = cpu_seconds(pid) - before
            per_request = spent * 1000 / result.requests if result.requests else None
            runs.append(Measured(result, per_request, peak.peak_bytes / 2**20))
        runs.sort(key=lambda m: m.load.rps)
        return runs[len(runs) // 2]


def _row(scenario: str, via: str, body: EditBody, m: Measured, direct: Measured | None) -> Row:
    load = m.load
    row = Row(
        scenario=scenario,
        via=via,
        connections=load.connections,
        rps=load.rps,
        mb_s=load.rps * body.size / MB,
        p50_ms=load.p50_ms,
        p99_ms=load.p99_ms,
        errors=load.failed,
        refused_503=load.refused,
        peak_rss_mb=m.peak_rss_mb,
        cpu_ms_per_request=m.cpu_ms_per_request,
    )
    if direct is not None and None not in (load.p50_ms, direct.load.p50_ms):
        row.added_p50_ms = load.p50_ms - direct.load.p50_ms  # type: ignore[operator]
        row.added_p99_ms = load.p99_ms - direct.load.p99_ms  # type: ignore[operator]
    return row


# --- scenarios -----------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    run: Callable[[Bench], list[Row]]
    default: bool = True


SCENARIOS: list[Scenario] = []


def register(scenario: Scenario) -> Scenario:
    SCENARIOS.append(scenario)
    return scenario


def side_by_side(name: str, body_name: str, connections: int, gateway: str = "fast") -> Scenario:
    def run(bench: Bench) -> list[Row]:
        body = bench.body(body_name)
        upstream = bench.upstream("fast")
        gw = bench.gateway(gateway)
        direct = bench.measure(upstream.url, upstream.pid, body, connections)
        through = bench.measure(gw.url, gw.pid, body, connections)
        return [
            _row(name, "direct", body, direct, None),
            _row(name, "gateway", body, through, direct),
        ]

    return Scenario(name, run)


for _connections in (1, 16, 64):
    register(side_by_side(f"1x1MB c={_connections}", "1x1MB", _connections))
register(side_by_side("4x5MB c=16", "4x5MB", 16))


def _cache_hit(bench: Bench) -> list[Row]:
    name = "1MB cache hit c=16"
    body = bench.body("1x1MB")
    try:
        gw = bench.gateway("cache")
    except RuntimeError as exc:  # no redis-server and no way to install one
        return [Row(name, "gateway", 16, note=f"n/a: {exc}")]
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": body.content_type}
    content = body.path.read_bytes()
    answers = [
        httpx.post(gw.url + "/images/edits", content=content, headers=headers, timeout=30)
        for _ in range(2)
    ]
    if answers[1].headers.get("x-cache") != "hit":
        why = f"n/a: no result cache on this build (x-cache: {answers[1].headers.get('x-cache')})"
        return [Row(name, "gateway", 16, note=why)]
    upstream = bench.upstream("fast")
    direct = bench.measure(upstream.url, upstream.pid, body, 16)
    through = bench.measure(gw.url, gw.pid, body, 16)
    return [_row(name, "direct", body, direct, None), _row(name, "gateway", body, through, direct)]


register(Scenario("1MB cache hit c=16", _cache_hit))


def _cache_miss(bench: Bench) -> list[Row]:
    """Every request with `Cache-Control: no-cache`: hashed, forwarded, and its result written to
    Redis, the path a first edit takes with the cache on (the forwarding rows run it off)."""
    name = "1MB cache miss c=16"
    body = bench.body("1x1MB")
    try:
        gw = bench.gateway("cache")
    except RuntimeError as exc:
        return [Row(name, "gateway", 16, note=f"n/a: {exc}")]
    upstream = bench.upstream("fast")
    direct = bench.measure(upstream.url, upstream.pid, body, 16)
    os.environ["BENCH_CACHE_CONTROL"] = "no-cache"
    try:
        through = bench.measure(gw.url, gw.pid, body, 16)
    finally:
        del os.environ["BENCH_CACHE_CONTROL"]
    return [_row(name, "direct", body, direct, None), _row(name, "gateway", body, through, direct)]


register(Scenario("1MB cache miss c=16", _cache_miss))


def _memory(bench: Bench) -> list[Row]:
    """32 edits of 4 x 10 MB in flight at once against an upstream that waits 2 s."""
    name = "memory 32x(4x10MB)"
    body = bench.body("4x10MB")
    gw = bench.gateway("slow")
    run_python(gw.url, bench.body("1x1MB"), connections=4, duration=1, client_key=CLIENT_KEY)
    with PeakRss(gw.pid) as peak:
        before = cpu_seconds(gw.pid)
        load = run_python(
            gw.url,
            body,
            connections=32,
            duration=60,
            client_key=CLIENT_KEY,
            requests_per_connection=bench.args.memory_rounds,
        )
        spent = cpu_seconds(gw.pid) - before
    left = gw.spooled_files_open()
    in_flight_gb = 32 * body.size / 1e9
    m = Measured(
        load, spent * 1000 / load.requests if load.requests else None, peak.peak_bytes / 2**20
    )
    row = _row(name, "gateway", body, m, None)
    row.note = f"{in_flight_gb:.2f} GB in flight; spool files left after: {left}"
    return [row]


register(Scenario("memory", _memory))


def _overload(bench: Bench) -> list[Row]:
    """256 clients (retrying after retry-after, as the SDK does) against a 2 s upstream."""
    name = f"overload c=256 limit={BENCH_LIMITS['max_in_flight']}"
    body = bench.body("1x1MB")
    gw = bench.gateway("slow")
    # The same 256 clients straight at the slow upstream (it has no limit: all admitted): what
    # the load generator and the upstream themselves add to the 2 s.
    upstream = bench.upstream("slow")
    direct = run_python(
        upstream.url,
        body,
        connections=256,
        duration=bench.args.overload_seconds,
        client_key=CLIENT_KEY,
        honour_retry_after=True,
        warmup=OVERLOAD_WARMUP_SECONDS,
    )
    direct_row = _row(name, "direct", body, Measured(direct, None, None), None)
    direct_row.steady_p99_ms = direct.steady_p99_ms
    with PeakRss(gw.pid) as peak:
        before = cpu_seconds(gw.pid)
        load = run_python(
            gw.url,
            body,
            connections=256,
            duration=bench.args.overload_seconds,
            client_key=CLIENT_KEY,
            honour_retry_after=True,
            warmup=OVERLOAD_WARMUP_SECONDS,
        )
        spent = cpu_seconds(gw.pid) - before
    m = Measured(
        load, spent * 1000 / load.requests if load.requests else None, peak.peak_bytes / 2**20
    )
    row = _row(name, "gateway", body, m, None)
    row.steady_p99_ms = load.steady_p99_ms
    row.note = (
        f"p50/p99 of admitted requests; upstream takes {SLOW_UPSTREAM_SECONDS:g} s; p99 of those "
        f"started after the first {OVERLOAD_WARMUP_SECONDS:g} s: {_fmt(load.steady_p99_ms, 0)} ms "
        f"(direct to the upstream: p99 {_fmt(direct.p99_ms, 0)} ms, after the first "
        f"{OVERLOAD_WARMUP_SECONDS:g} s {_fmt(direct.steady_p99_ms, 0)} ms)"
    )
    return [direct_row, row]


register(Scenario("overload", _overload))


# --- targets, table, JSON ------------------------------------------------------------------------


def _find(rows: list[Row], scenario: str, via: str = "gateway") -> Row | None:
    return next((r for r in rows if r.scenario == scenario and r.via == via), None)


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    checks: list[tuple[str, str, str, Callable[[Row], float | None], float, bool]] = [
        ("1MB c=1 added p50 (ms)", "1x1MB c=1", "gateway", lambda r: r.added_p50_ms, 2.5, True),
        ("1MB c=1 added p99 (ms)", "1x1MB c=1", "gateway", lambda r: r.added_p99_ms, 5.0, True),
        ("1MB c=16 req/s", "1x1MB c=16", "gateway", lambda r: r.rps, 300, False),
        ("4x5MB c=16 MB/s", "4x5MB c=16", "gateway", lambda r: r.mb_s, 250, False),
        ("1MB cache hit c=16 req/s", "1MB cache hit c=16", "gateway", lambda r: r.rps, 400, False),
        (
            "memory peak RSS (MB)",
            "memory 32x(4x10MB)",
            "gateway",
            lambda r: r.peak_rss_mb,
            400,
            True,
        ),
    ]
    out = []
    for label, scenario, via, get, limit, at_most in checks:
        row = _find(rows, scenario, via)
        value = get(row) if row is not None else None
        met = None if value is None else (value <= limit if at_most else value >= limit)
        out.append(
            {
                "target": label,
                "limit": f"{'<=' if at_most else '>='} {limit:g}",
                "value": value,
                "met": met,
            }
        )
    overload = next(
        (r for r in rows if r.scenario.startswith("overload") and r.via == "gateway"), None
    )
    if overload is not None:
        out.append(
            {
                "target": "overload: failures other than 503",
                "limit": "== 0",
                "value": overload.errors,
                "met": overload.errors == 0,
            }
        )
        limit = SLOW_UPSTREAM_SECONDS * 1100
        for label, p99 in (
            ("overload: admitted p99, all (ms)", overload.p99_ms),
            (
                f"overload: admitted p99, after first {OVERLOAD_WARMUP_SECONDS:g} s (ms)",
                overload.steady_p99_ms,
            ),
        ):
            out.append(
                {
                    "target": label,
                    "limit": f"<= {limit:g}",
                    "value": p99,
                    "met": None if p99 is None else p99 <= limit,
                }
            )
    memory = _find(rows, "memory 32x(4x10MB)")
    if memory is not None:
        left = int(memory.note.rsplit(":", 1)[1]) if "left after" in memory.note else None
        out.append(
            {
                "target": "memory: spool files left after",
                "limit": "== 0",
                "value": left,
                "met": left == 0,
            }
        )
    fast = [r for r in rows if r.scenario == "1x1MB c=16"]
    if len(fast) == 2 and fast[0].rps and fast[1].rps:
        ratio = fast[0].rps / fast[1].rps
        out.append(
            {
                "target": "upstream headroom (direct/gateway req/s, 1MB c=16)",
                "limit": ">= 5",
                "value": ratio,
                "met": ratio >= 5,
            }
        )
    return out


def _fmt(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def table(rows: list[Row]) -> str:
    header = (
        "scenario",
        "via",
        "c",
        "req/s",
        "MB/s",
        "p50 ms",
        "p99 ms",
        "+p50 ms",
        "+p99 ms",
        "errors",
        "503s",
        "peak RSS MB",
        "CPU ms/req",
    )
    lines = [header]
    for r in rows:
        if r.note.startswith("n/a"):
            lines.append((r.scenario, r.via, str(r.connections), r.note, *[""] * 9))
            continue
        lines.append(
            (
                r.scenario,
                r.via,
                str(r.connections),
                _fmt(r.rps),
                _fmt(r.mb_s),
                _fmt(r.p50_ms, 2),
                _fmt(r.p99_ms, 2),
                _fmt(r.added_p50_ms, 2),
                _fmt(r.added_p99_ms, 2),
                _fmt(r.errors),
                _fmt(r.refused_503),
                _fmt(r.peak_rss_mb, 0) if r.via == "gateway" else "-",
                _fmt(r.cpu_ms_per_request, 2),
            )
        )
    out = ["| " + " | ".join(line) + " |" for line in lines]
    out.insert(1, "|" + "|".join("---" for _ in header) + "|")
    notes = [f"- {r.scenario}: {r.note}" for r in rows if r.note and not r.note.startswith("n/a")]
    return "\n".join(out + (["", *notes] if notes else []))


def targets_table(checks: list[dict[str, Any]]) -> str:
    out = ["| target | limit | measured | met |", "|---|---|---|---|"]
    for c in checks:
        met = {True: "yes", False: "NO", None: "n/a"}[c["met"]]
        value = c["value"]
        shown = (
            "-" if value is None else (f"{value:.2f}" if isinstance(value, float) else str(value))
        )
        out.append(f"| {c['target']} | {c['limit']} | {shown} | {met} |")
    return "\n".join(out)


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def _tool_version(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    return (done.stdout + done.stderr).strip().splitlines()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.run")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measured run")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median kept)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (substrings)")
    parser.add_argument("--python-load", action="store_true", help="use the asyncio generator")
    parser.add_argument("--asyncio-upstream", action="store_true", help="skip nginx")
    parser.add_argument("--memory-rounds", type=int, default=2, help="edits per memory client")
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--list", action="store_true", help="list scenarios and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(s.name for s in SCENARIOS))
        return 0
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    selected = [s for s in SCENARIOS if (any(w in s.name for w in wanted) if wanted else s.default)]

    started = time.time()
    info = machine()
    rows: list[Row] = []
    workdir = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    bench = Bench(args, workdir)
    try:
        for scenario in selected:
            print(f"running {scenario.name} ...", file=sys.stderr, flush=True)
            rows += scenario.run(bench)
        upstream_kind = bench.upstream("fast").kind
    finally:
        bench.close()
        shutil.rmtree(workdir, ignore_errors=True)
    info["load_average_after"] = os.getloadavg()
    checks = targets(rows)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": info,
        "tools": {
            "load": _tool_version(["wrk", "-v"]) if bench.use_wrk else "python asyncio generator",
            "fast_upstream": upstream_kind,
            "slow_upstream": f"asyncio, answers after {SLOW_UPSTREAM_SECONDS:g} s",
        },
        "options": vars(args),
        "rows": [asdict(r) for r in rows],
        "targets": checks,
    }
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    for path in (RESULTS / f"bench-{stamp}.json", RESULTS / "latest.json"):
        path.write_text(json.dumps(report, indent=2))
    print(
        f"\nMachine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; load average "
        f"{info['load_average'][0]:.2f} before, {info['load_average_after'][0]:.2f} after; "
        f"load: {report['tools']['load']}; fast upstream: {upstream_kind}\n"
    )
    print(table(rows))
    print()
    print(targets_table(checks))
    print(f"\nJSON: {RESULTS / f'bench-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
