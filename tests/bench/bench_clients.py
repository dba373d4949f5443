"""Benchmark: what client limits and usage accounting add to an edit, through the real gateway,
Redis and HTTP.

Run from the repo root: `.venv/bin/python -m tests.bench.bench_clients [--requests N]`.
Bounded (N sequential requests per case), loopback only; prints percentiles, asserts nothing.
Cases: a client with no limits (usage accounting only) and one with every limit set (two Lua
scripts, a lease release and the usage write per edit).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import UPSTREAM_KEYS
from tests.support.gateway_config import write_gateway_config
from tests.support.redis_server import test_redis_url
from tests.support.servers import serve_in_thread

KEYS = {"free": "igw-bench-free-0123456789", "limited": "igw-bench-limited-0123456789"}


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return (
        f"p50 {at(0.5):7.2f} ms  p90 {at(0.9):7.2f} ms  p99 {at(0.99):7.2f} ms  "
        f"mean {statistics.fmean(ordered) * 1000:7.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    png = images.png(64, 64)
    fake = FakeOpenAIUpstream()
    huge = 10**9
    clients = {
        "named": {
            "free": {"keys_env": "BENCH_FREE"},
            "limited": {
                "keys_env": "BENCH_LIMITED",
                "limits": {
                    "requests_per_minute": huge,
                    "images_per_minute": huge,
                    "concurrent_requests": huge,
                    "images_per_day": huge,
                    "images_per_month": huge,
                },
            },
        }
    }
    with (
        test_redis_url() as (redis_url, _),
        serve_in_thread(fake.app) as upstream_url,
        tempfile.TemporaryDirectory() as directory,
    ):
        config = write_gateway_config(Path(directory), clients=clients, redis_url=redis_url)
        env = {
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_UPSTREAM_URL": upstream_url + "/v1",
            "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
            "BENCH_FREE": KEYS["free"],
            "BENCH_LIMITED": KEYS["limited"],
        }
        with (
            serve_in_thread(create_app(load_settings(env=env))) as url,
            httpx.Client(timeout=30) as http,
        ):
            for name, key in KEYS.items():
                headers = {"authorization": f"Bearer {key}"}
                timings = []
                for number in range(args.requests + 20):
                    started = time.perf_counter()
                    response = http.post(
                        url + "/v1/images/edits",
                        headers=headers,
                        files={"image": ("a.png", png, "image/png")},
                        data={"prompt": f"bench {number}"},
                    )
                    elapsed = time.perf_counter() - started
                    response.raise_for_status()
                    if number >= 20:  # warm-up excluded
                        timings.append(elapsed)
                print(f"edit, {name:8s} {percentiles(timings)}")
        print(f"gate only, every limit: {percentiles(asyncio.run(gate_only(redis_url, args)))}")


async def gate_only(redis_url: str, args: argparse.Namespace) -> list[float]:
    """The client gate's own Redis work for one edit, without HTTP or the upstream."""
    import redis.asyncio as aioredis

    from app.config.tenants import ClientLimits
    from app.tenants.directory import ClientPolicy
    from app.tenants.limiter import Limiter
    from app.tenants.usage import Usage, UsageLedger

    redis = aioredis.from_url(redis_url)
    limiter = Limiter(redis, namespace="bench")
    ledger = UsageLedger(redis, namespace="bench")
    huge = 10**9
    policy = ClientPolicy("limited", None, ClientLimits(
        requests_per_minute=huge, images_per_minute=huge, concurrent_requests=huge,
        images_per_day=huge, images_per_month=huge,
    ))  # fmt: skip
    timings = []
    for number in range(args.requests + 20):
        started = time.perf_counter()
        slot = await limiter.admit(policy, f"req_{number}")
        await slot.take_images(1)
        await slot.settle(1)
        await ledger.record("limited", "gpt-image-1", Usage(requests=1, images=1))
        await slot.release()
        if number >= 20:
            timings.append(time.perf_counter() - started)
    await redis.aclose()
    return timings


if __name__ == "__main__":
    main()
