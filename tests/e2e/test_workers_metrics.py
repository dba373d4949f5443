"""Acceptance: with `image-gateway serve --workers 2`, a scrape of any worker counts the requests
every worker served (prometheus-client multiprocess mode), and the shared directory is removed
when the gateway stops."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.gateway_env import gateway_env
from tests.support.gateway_process import gateway_process
from tests.support.prom import total
from tests.support.sdk import sdk_client

N = 20
EDITS = "/v1/images/edits"


def test_two_workers_report_the_sum_of_their_counters(
    upstream: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = gateway_env(upstream.url, GATEWAY_METRICS_PUBLIC="true", TMPDIR=str(temp))
    png = images.png(32, 32)
    with gateway_process(env, tmp_path / "gateway.log", workers=2) as gateway:
        for _ in range(N):
            # A client per request: a new connection each time, which either worker may accept.
            with sdk_client(gateway.url) as client:
                client.images.edit(image=("a.png", png, "image/png"), prompt="x")
        (metrics_dir,) = temp.iterdir()  # made by the CLI for this run
        assert metrics_dir.name.startswith("image-gateway-metrics-")
        scrapes = [httpx.get(gateway.url + "/metrics").text for _ in range(6)]
        gateway.terminate()
        assert gateway.process.wait(timeout=60) == 0
        output = gateway.output()

    for text in scrapes:  # whichever worker answered the scrape
        assert total(text, "gateway_requests_total", route=EDITS, status_class="2xx") == N
        assert total(text, "gateway_request_duration_seconds_count", route=EDITS) == N
        assert total(text, "gateway_images_returned_total") == N
        assert total(text, "gateway_upstream_requests_total", outcome="ok") == N
        assert total(text, "gateway_requests_in_flight") == 0
    assert len(upstream.edits) == N
    access = [line for line in output.splitlines() if '"logger":"gateway.access"' in line]
    assert sum(f'"route":"{EDITS}"' in line for line in access) == N
    assert list(temp.iterdir()) == []  # the metrics directory went with the gateway
