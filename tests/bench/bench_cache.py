"""Benchmark: cache-hit latency against a miss, through the real gateway, Redis and HTTP.

Run from the repo root: `.venv/bin/python -m tests.bench.bench_cache [--requests N] [--kib K]`.
Bounded (N sequential requests per case), loopback only; prints percentiles, asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import httpx

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_env import gateway_settings
from tests.support.redis_server import test_redis_url
from tests.support.servers import serve_in_thread


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
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--kib", type=int, default=256, help="size of the uploaded image")
    args = parser.parse_args()
    side = max(8, int((args.kib * 1024 / 3) ** 0.5))
    source = images.noise_png(side, side)
    fake = FakeOpenAIUpstream()
    with (
        serve_in_thread(fake.app) as upstream_url,
        test_redis_url() as (redis_url, _),
    ):
        settings = gateway_settings(
            upstream_url + "/v1", GATEWAY_REDIS_URL=redis_url, GATEWAY_CACHE_ENABLED="true"
        )
        with (
            serve_in_thread(create_app(settings)) as url,
            httpx.Client(base_url=url, headers={"authorization": f"Bearer {CLIENT_KEY}"}) as http,
        ):

            def edit(prompt: str, response_format: str = "b64_json") -> tuple[float, str]:
                started = time.perf_counter()
                response = http.post(
                    "/v1/images/edits",
                    data={"prompt": prompt, "response_format": response_format},
                    files={"image": ("a.png", source, "image/png")},
                    timeout=60,
                )
                response.raise_for_status()
                return time.perf_counter() - started, response.headers["x-cache"]

            misses = [edit(uuid.uuid4().hex) for _ in range(args.requests)]
            prompt = uuid.uuid4().hex
            edit(prompt)
            hits = [edit(prompt) for _ in range(args.requests)]
            url_hits = [edit(prompt, "url") for _ in range(args.requests)]
            assert {state for _, state in misses} == {"miss"}
            assert {state for _, state in hits + url_hits} == {"hit"}
    print(f"upload {len(source) / 1024:.0f} KiB, {args.requests} sequential requests per case")
    print("miss (fake upstream, no delay): " + percentiles([t for t, _ in misses]))
    print("hit, b64_json:                  " + percentiles([t for t, _ in hits]))
    print("hit, url:                       " + percentiles([t for t, _ in url_hits]))


if __name__ == "__main__":
    main()
