"""The soak: `python -m tests.bench.soak` (options: --help).

An operator's bad day, bounded (a few minutes by default) and on loopback only. It starts a
private Redis, the asyncio fake upstream with three keys and fault controls (tests/bench/
upstream.py) and the gateway as `image-gateway serve --workers 2` runs it, then drives clients
using the real OpenAI SDK (repeated edits the cache answers, unique edits, generations, a few bad
requests expecting a 4xx, a few clients giving up early) through one phase after another,
`--phase-seconds` each: baseline; one key answering 429; 30% of calls answered 500; one key
hanging; Redis stopped (restarted empty at the phase's end); the upstream killed, so connections
are refused (back at the phase's end); recovery; then SIGTERM with requests in flight, while the
clients keep opening new ones until the gateway has exited.

It prints one row per phase (each request counted in the phase it started in) and writes JSON to
tests/bench/results/. A 5xx is the upstream's, passed on, when its envelope's type is
`upstream_error`; any other 5xx is one the gateway made itself. The exit status is 1 when a
phase shows a 5xx the gateway made, a client timed out, the drain misbehaved or the gateway
logged a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import redis
from openai import AsyncOpenAI

from tests.bench.gateway import CLIENT_KEY, GatewayProcess, tree_open_fds, tree_rss_bytes
from tests.bench.run import RESULTS, machine
from tests.bench.upstream import AsyncioUpstream, Faults
from tests.support import images
from tests.support.prom import total
from tests.support.redis_server import PrivateRedis

MODEL = "gpt-image-1.5"
UPSTREAM_KEYS = tuple(f"sk-soak-upstream-{name}-0123456789abcdef" for name in "abc")
PNG = images.png(64, 64)
# What a client sends, and how often: weights out of 100.
MIX = {"repeat": 35, "unique": 30, "generation": 15, "bad": 10, "abandon": 10}
REPEATED_PROMPTS = 4
# Outcome classes, in the table's order.
CLASSES = (
    "2xx",
    "4xx bad",
    "4xx other",
    "5xx gateway",
    "5xx upstream",
    "drain",
    "conn error",
    "timeout",
    "abandoned",
)
# How long a new request may take to be turned away once the gateway drains.
REFUSED_WITHIN = 1.0


# --- the phases ----------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    begin: Callable[[Soak], None] = lambda soak: None
    end: Callable[[Soak], None] = lambda soak: None


def _normal(soak: Soak) -> None:
    soak.upstream.set_faults(Faults(delay=soak.args.latency))


PHASES = [
    Phase("baseline"),
    Phase(
        "1 key answers 429",
        begin=lambda soak: soak.upstream.set_faults(
            Faults(
                delay=soak.args.latency,
                keys={
                    UPSTREAM_KEYS[0]: {
                        "error_rate": 1.0,
                        "error_status": 429,
                        "retry_after": max(1.0, soak.args.phase_seconds / 4),
                    }
                },
            )
        ),
        end=_normal,
    ),
    Phase(
        "30% of calls 500",
        begin=lambda soak: soak.upstream.set_faults(
            Faults(delay=soak.args.latency, error_rate=0.3)
        ),
        end=_normal,
    ),
    Phase(
        "1 key hangs",
        begin=lambda soak: soak.upstream.set_faults(
            Faults(delay=soak.args.latency, keys={UPSTREAM_KEYS[1]: {"delay": soak.hang_seconds}})
        ),
        end=_normal,
    ),
    Phase(
        "Redis down, back empty",
        begin=lambda soak: soak.redis.stop(),
        end=lambda soak: soak.redis.start(),
    ),
    Phase(
        "upstream down, back",
        begin=lambda soak: soak.upstream.stop(),
        end=lambda soak: soak.upstream.start(),
    ),
    Phase("recovery"),
]
SIGTERM_PHASE = "SIGTERM, new requests"


# --- the run -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    phase: int
    kind: str
    result: str  # one of CLASSES
    status: int | None
    code: str | None
    started: float  # seconds since the soak began
    seconds: float


@dataclass
class Sample:
    """The gateway's state at the end of a phase."""

    rss_mb: float | None = None
    open_fds: int | None = None
    redis_keys: int | None = None  # None: Redis was down
    in_flight: float | None = None  # the gateway's own gauge, all workers


@dataclass
class Drain:
    signalled_at: float | None = None  # seconds since the soak began
    # When every worker had logged that it drains (with --workers, after the parent shut the
    # listening socket): requests started from then on are the "new" ones.
    draining_after: float | None = None
    exited_after: float | None = None
    exit_code: int | None = None
    in_flight: dict[str, int] = field(default_factory=dict)  # result -> count
    racing: int = 0  # started between the signal and the drain's log line: neither
    new: dict[str, int] = field(default_factory=dict)
    slowest_refusal: float | None = None


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.hang_seconds = args.hang_seconds or max(
            4 * args.latency, min(20.0, args.phase_seconds)
        )
        self.redis = PrivateRedis()
        self.upstream = AsyncioUpstream(delay=args.latency)
        self.gateway = GatewayProcess(
            workdir,
            "soak",
            self.upstream.url,
            workers=args.workers,
            env={
                "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
                "GATEWAY_REDIS_URL": self.redis.url,
                "GATEWAY_CACHE_ENABLED": "true",
            },
            sections={"shutdown": {"drain_timeout": args.drain_timeout}},
        )
        self.phase = 0
        self.began = time.monotonic()
        self.signalled: float | None = None
        self.draining: float | None = None
        self.stopped = False
        self.outcomes: list[Outcome] = []
        self.samples: list[Sample] = []
        self.drain = Drain()

    def now(self) -> float:
        return time.monotonic() - self.began

    def start(self) -> None:
        self.redis.start()
        self.upstream.start()
        self.gateway.start()

    def close(self) -> None:
        self.gateway.stop()
        self.upstream.stop()
        self.redis.stop()
        shutil.rmtree(self.redis._dir, ignore_errors=True)

    # -- measuring --
    def sample(self) -> Sample:
        pid = self.gateway.pid
        found = Sample(rss_mb=tree_rss_bytes(pid) / 2**20, open_fds=tree_open_fds(pid))
        try:
            found.redis_keys = int(
                redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=2).dbsize()
            )
        except redis.RedisError:
            found.redis_keys = None
        try:
            scrape = httpx.get(
                self.gateway.url.removesuffix("/v1") + "/metrics",
                headers={"authorization": f"Bearer {CLIENT_KEY}"},
                timeout=5,
            )
            found.in_flight = total(scrape.text, "gateway_requests_in_flight")
        except httpx.HTTPError:
            found.in_flight = None
        return found

    # -- the clients --
    async def client(self, index: int) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        sdk = AsyncOpenAI(
            base_url=self.gateway.url,
            api_key=CLIENT_KEY,
            max_retries=0,
            timeout=self.args.client_timeout,
        )
        kinds, weights = list(MIX), list(MIX.values())
        try:
            while not self.stopped:
                kind = rng.choices(kinds, weights)[0]
                phase = self.phase
                started = self.now()
                result, status, code = await self.request(sdk, kind, rng)
                self.outcomes.append(
                    Outcome(phase, kind, result, status, code, started, self.now() - started)
                )
                if result in ("drain", "conn error"):
                    await asyncio.sleep(0.05)  # turned away: do not spin
        finally:
            await sdk.close()

    async def request(
        self, sdk: AsyncOpenAI, kind: str, rng: random.Random
    ) -> tuple[str, int | None, str | None]:
        image = ("photo.png", PNG, "image/png")
        unique = f"soak {uuid.uuid4().hex}"
        try:
            if kind == "repeat":
                prompt = f"soak repeated {rng.randrange(REPEATED_PROMPTS)}"
                await sdk.images.edit(image=image, prompt=prompt, model=MODEL)
            elif kind == "unique":
                await sdk.images.edit(image=image, prompt=unique, model=MODEL)
            elif kind == "generation":
                await sdk.images.generate(prompt=unique, model=MODEL)
            elif kind == "abandon":
                hasty = sdk.with_options(timeout=self.args.latency / 2)
                await hasty.images.edit(image=image, prompt=unique, model=MODEL)
            else:
                bad = rng.randrange(3)
                if bad == 0:
                    text = ("photo.png", b"not an image at all", "image/png")
                    await sdk.images.edit(image=text, prompt=unique, model=MODEL)
                elif bad == 1:
                    await sdk.images.edit(image=image, prompt=unique, model=MODEL, n=99)
                else:
                    await sdk.images.edit(image=image, prompt=unique, model="no-such-model")
        except openai.APITimeoutError:
            return ("abandoned" if kind == "abandon" else "timeout"), None, None
        except openai.APIConnectionError:
            return ("drain" if self.signalled is not None else "conn error"), None, None
        except openai.APIStatusError as exc:
            return _classify(kind, exc.status_code, exc.type, exc.code), exc.status_code, exc.code
        return "2xx", 200, None

    # -- the phases --
    async def run(self) -> None:
        clients = [asyncio.create_task(self.client(i)) for i in range(self.args.concurrency)]
        try:
            for index, phase in enumerate(PHASES):
                self.phase = index
                print(f"phase {index + 1}/{len(PHASES) + 1}: {phase.name}", file=sys.stderr)
                await asyncio.to_thread(phase.begin, self)
                await asyncio.sleep(self.args.phase_seconds)
                self.samples.append(await asyncio.to_thread(self.sample))
                await asyncio.to_thread(phase.end, self)
            await self.terminate()
        finally:
            self.stopped = True
            await asyncio.gather(*clients)

    async def terminate(self) -> None:
        self.phase = len(PHASES)
        print(f"phase {self.phase + 1}/{self.phase + 1}: SIGTERM", file=sys.stderr)
        process = self.gateway.process
        assert process is not None
        self.signalled = self.now()
        process.send_signal(signal.SIGTERM)
        self.draining = await self.drain_logged()
        # The drain limit, uvicorn's backstop past it (app/cli.py), and some slack.
        limit = self.args.drain_timeout + 10
        try:
            code: int | None = await asyncio.to_thread(process.wait, limit)
        except subprocess.TimeoutExpired:
            # Still running: the drain failed. Nothing else will stop a stuck worker.
            code = None
            await asyncio.to_thread(self.gateway.kill)
        self.drain.signalled_at = self.signalled
        if self.draining is not None:
            self.drain.draining_after = self.draining - self.signalled
        self.drain.exit_code = code
        if code is not None:
            self.drain.exited_after = self.now() - self.signalled
        self.samples.append(Sample())

    async def drain_logged(self) -> float | None:
        """When every worker has logged that it drains (None: not within 5 s)."""
        for _ in range(500):
            log = self.gateway.log_path.read_text(errors="replace")
            if log.count('"msg":"draining:') >= self.args.workers:
                return self.now()
            await asyncio.sleep(0.01)
        return None

    # -- the report --
    def summarize_drain(self) -> None:
        signalled = self.signalled
        if signalled is None:
            return
        draining = self.draining if self.draining is not None else float("inf")
        before = [o for o in self.outcomes if o.started < signalled < o.started + o.seconds]
        after = [o for o in self.outcomes if o.started >= draining]
        self.drain.in_flight = dict(Counter(o.result for o in before))
        self.drain.racing = sum(1 for o in self.outcomes if signalled <= o.started < draining)
        self.drain.new = dict(Counter(o.result for o in after))
        refusals = [o.seconds for o in after if o.result == "drain"]
        self.drain.slowest_refusal = max(refusals) if refusals else None


def _classify(kind: str, status: int, error_type: str | None, code: str | None) -> str:
    if code == "gateway_draining":
        return "drain"
    if status < 500:
        return "4xx bad" if kind == "bad" else "4xx other"
    return "5xx upstream" if error_type == "upstream_error" else "5xx gateway"


def rows(soak: Soak) -> list[dict[str, Any]]:
    names = [phase.name for phase in PHASES] + [SIGTERM_PHASE]
    out = []
    for index, name in enumerate(names):
        mine = [o for o in soak.outcomes if o.phase == index]
        counts = Counter(o.result for o in mine)
        ok = sorted(o.seconds for o in mine if o.result == "2xx")
        sample = soak.samples[index] if index < len(soak.samples) else Sample()
        out.append(
            {
                "phase": name,
                "requests": len(mine),
                **{cls: counts.get(cls, 0) for cls in CLASSES},
                "p50_ms": _percentile(ok, 0.50),
                "p99_ms": _percentile(ok, 0.99),
                **asdict(sample),
                "codes": dict(Counter(f"{o.status} {o.code}" for o in mine if o.status != 200)),
            }
        )
    return out


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0] * 1000
    return statistics.quantiles(values, n=100, method="inclusive")[round(fraction * 100) - 1] * 1000


def _fmt(value: object, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(report_rows: list[dict[str, Any]]) -> str:
    header = ["phase", "requests", *CLASSES, "p50 ms", "p99 ms", "RSS MB", "fds", "Redis keys"]
    header.append("in flight")
    lines = [header]
    for row in report_rows:
        lines.append(
            [
                row["phase"],
                str(row["requests"]),
                *(str(row[cls]) for cls in CLASSES),
                _fmt(row["p50_ms"]),
                _fmt(row["p99_ms"]),
                _fmt(row["rss_mb"]),
                _fmt(row["open_fds"]),
                _fmt(row["redis_keys"]),
                _fmt(row["in_flight"]),
            ]
        )
    out = ["| " + " | ".join(line) + " |" for line in lines]
    out.insert(1, "|" + "|".join("---" for _ in header) + "|")
    return "\n".join(out)


def verdict(soak: Soak, report_rows: list[dict[str, Any]], log: str) -> dict[str, Any]:
    drain = soak.drain
    checks = {
        "no 5xx made by the gateway": sum(row["5xx gateway"] for row in report_rows) == 0,
        "no client timed out": sum(row["timeout"] for row in report_rows) == 0,
        "requests in flight at SIGTERM answered as usual": set(drain.in_flight)
        <= {"2xx", "4xx bad", "abandoned"},
        f"drain began within {REFUSED_WITHIN:g} s": (
            drain.draining_after is not None and drain.draining_after < REFUSED_WITHIN
        ),
        "every new request refused or 503 after SIGTERM": set(drain.new) <= {"drain"},
        f"each refusal within {REFUSED_WITHIN:g} s": (drain.slowest_refusal or 0) < REFUSED_WITHIN,
        "the gateway exited 0": drain.exit_code == 0,
        "no traceback logged": "Traceback" not in log,
    }
    return {"passed": all(checks.values()), "checks": checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak")
    parser.add_argument("--phase-seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=12, help="clients at once")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes")
    parser.add_argument("--latency", type=float, default=1.0, help="upstream seconds per call")
    parser.add_argument(
        "--hang-seconds", type=float, default=None, help="the hanging key's delay (default: phase)"
    )
    parser.add_argument("--client-timeout", type=float, default=60.0, help="SDK timeout (s)")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="shutdown.drain_timeout")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    soak = Soak(args, workdir)
    started = time.time()
    info = machine()
    try:
        soak.start()
        asyncio.run(soak.run())
        log = soak.gateway.log_path.read_text(errors="replace")
    finally:
        soak.close()
    soak.summarize_drain()
    report_rows = rows(soak)
    outcome = verdict(soak, report_rows, log)
    report = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "seconds": round(time.time() - started, 1),
        "machine": info,
        "options": {**vars(args), "results": str(args.results)},
        "hang_seconds": soak.hang_seconds,
        "mix": MIX,
        "phases": report_rows,
        "drain": asdict(soak.drain),
        "tracebacks_logged": log.count("Traceback"),
        "verdict": outcome,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    path = args.results / f"soak-{stamp}.json"
    for target in (path, args.results / "soak-latest.json"):
        target.write_text(json.dumps(report, indent=2))
    # The gateway's own log beside it, for whoever has to explain a row.
    path.with_suffix(".log").write_text(log)
    shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\nSoak: {args.phase_seconds:g} s phases, {args.concurrency} clients, {args.workers} "
        f"workers, upstream {args.latency:g} s per call (hanging key {soak.hang_seconds:g} s); "
        f"{info['cpu']}, {info['cores']} cores\n"
    )
    print(table(report_rows))
    drain = soak.drain
    print(
        f"\nSIGTERM: in flight then {drain.in_flight}; every worker draining "
        f"{_fmt(drain.draining_after, 3)} s after it; new requests from then on {drain.new} "
        f"(slowest refusal {_fmt(drain.slowest_refusal, 3)} s; {drain.racing} started in "
        f"between); exited {_fmt(drain.exited_after, 1)} s after the signal with status "
        f"{drain.exit_code}; tracebacks logged: {report['tracebacks_logged']}"
    )
    for name, row in ((row["phase"], row) for row in report_rows):
        if row["codes"]:
            print(f"- {name}: {row['codes']}")
    print()
    for check, passed in outcome["checks"].items():
        print(f"{'ok ' if passed else 'NO '} {check}")
    print(f"\nJSON: {path}")
    return 0 if outcome["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
