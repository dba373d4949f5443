"""Throughput scaling over gateway replicas: 1..N `image-gateway serve` processes behind nginx
(round robin), sharing one Redis (single server, Cluster or Sentinel), in front of a fast fake
upstream. Loopback only; every run is bounded by --duration; everything started is stopped.

  python -m tests.bench.scaleout --replicas 1,2,3 --duration 10 --connections 32 --redis single

Prints one row per replica count (edits/s, p50/p99, scaling against one replica) and the same as
JSON with --json. The result cache is off, so every edit reaches the upstream: what scales is the
gateway's request path plus its per-request Redis work (key pool, limits), not cache hits. On a
machine with fewer cores than replicas + load generator, expect the scaling to flatten.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tests.bench.gateway import CLIENT_KEY, GatewayProcess
from tests.bench.load import EditBody, LoadResult, run_python, run_wrk, wrk_binary
from tests.bench.upstream import fast_upstream
from tests.support import images
from tests.support.nginx import nginx_round_robin
from tests.support.redis_server import test_redis_url

MAX_DURATION = 120.0


def measure(
    replicas: int, *, redis_url: str, upstream_url: str, workdir: Path, args: argparse.Namespace
) -> LoadResult:
    with ExitStack() as stack:
        gateways = []
        for index in range(replicas):
            gateway = GatewayProcess(
                workdir,
                f"r{replicas}-{index}",
                upstream_url,
                env={"GATEWAY_REDIS_URL": redis_url, "GATEWAY_CACHE_ENABLED": "false"},
            ).start()
            stack.callback(gateway.stop)
            gateways.append(gateway)
        backends = [f"127.0.0.1:{gateway.port}" for gateway in gateways]
        url = stack.enter_context(nginx_round_robin(backends)) + "/v1"
        body = EditBody.build([images.png(256, 256)], workdir, f"edit-{replicas}")
        if args.load == "wrk" and wrk_binary(install=False):
            return run_wrk(
                url,
                body,
                connections=args.connections,
                duration=args.duration,
                client_key=CLIENT_KEY,
            )
        return run_python(
            url,
            body,
            connections=args.connections,
            duration=args.duration,
            client_key=CLIENT_KEY,
            warmup=1.0,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per count")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--redis", choices=("single", "cluster", "sentinel"), default="single")
    parser.add_argument("--load", choices=("python", "wrk"), default="python")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    args.duration = min(args.duration, MAX_DURATION)
    counts = [int(item) for item in args.replicas.split(",") if item.strip()]

    # test_redis_url starts the topology this variable names.
    os.environ["GATEWAY_TEST_REDIS_TOPOLOGY"] = args.redis
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gw-scaleout-")))
        upstream = fast_upstream()
        stack.callback(upstream.stop)
        redis_url, _server = stack.enter_context(test_redis_url())
        for count in counts:
            result = measure(
                count, redis_url=redis_url, upstream_url=upstream.url, workdir=workdir, args=args
            )
            rows.append({"replicas": count, **result.to_json()})
    base = rows[0]["rps"] if rows and rows[0]["replicas"] == 1 else None
    if args.json:
        print(json.dumps({"redis": args.redis, "rows": rows, "base_rps": base}, indent=2))
        return 0
    print(f"redis: {args.redis}, {args.connections} connections, {args.duration:.0f} s per count")
    print("replicas  edits/s   p50 ms   p99 ms  failed  scaling")
    for row in rows:
        scaling = f"{row['rps'] / base:.2f}x" if base else "-"
        p50 = row["p50_ms"] or 0.0
        p99 = row["p99_ms"] or 0.0
        failed = sum(row["failures"].values())
        print(
            f"{row['replicas']:>8}  {row['rps']:>7.1f}  {p50:>7.1f}  {p99:>7.1f}"
            f"  {failed:>6}  {scaling:>7}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
