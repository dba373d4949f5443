"""Acceptance: SIGTERM drains. The in-flight edit still gets its 200, a new request during the
drain is refused, and the process exits 0; past the drain timeout it exits anyway."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.main import create_app
from tests.conftest import CLIENT_KEY, gateway_env, gateway_settings
from tests.fakes.openai_upstream import images_response
from tests.support import images
from tests.support.gateway_process import gateway_process
from tests.support.servers import serve_in_thread

REPO = Path(__file__).resolve().parents[2]


class HeldUpstream:
    """An upstream that answers an edit only when the test releases it."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()
        self.app = Starlette(routes=[Route("/v1/images/edits", self._edit, methods=["POST"])])

    async def _edit(self, request: Request) -> Response:
        await request.body()
        self.arrived.set()
        for _ in range(3000):  # bounded: 60 s at most
            if self.release.is_set():
                break
            await asyncio.sleep(0.02)
        return JSONResponse(images_response(1))


@pytest.fixture
def held() -> Iterator[tuple[HeldUpstream, str]]:
    upstream = HeldUpstream()
    with serve_in_thread(upstream.app) as url:
        try:
            yield upstream, url + "/v1"
        finally:
            upstream.release.set()


def edit_in_background(url: str) -> tuple[threading.Thread, dict[str, object]]:
    outcome: dict[str, object] = {}

    def run() -> None:
        client = OpenAI(base_url=url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)
        try:
            outcome["result"] = client.images.edit(
                image=("a.png", images.png(), "image/png"), prompt="slow one"
            )
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def refused(url: str) -> bool:
    """Whether a brand-new request is turned away (connection refused or 503)."""
    try:
        response = httpx.get(
            url + "/v1/models", headers={"authorization": f"Bearer {CLIENT_KEY}"}, timeout=5
        )
    except httpx.TransportError:
        return True
    return response.status_code == 503


def wait_until(condition: object, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_sigterm_lets_the_in_flight_edit_finish_and_exits_0(
    held: tuple[HeldUpstream, str], tmp_path: Path
) -> None:
    upstream, upstream_url = held
    with gateway_process(gateway_env(upstream_url), tmp_path / "gateway.log") as gateway:
        thread, outcome = edit_in_background(gateway.url)
        assert upstream.arrived.wait(30), "the edit never reached the upstream"
        assert not refused(gateway.url)  # serving normally before the signal

        gateway.terminate()
        assert wait_until(lambda: refused(gateway.url), 15), "new requests were still accepted"
        assert thread.is_alive()  # the edit is still held upstream: this was during the drain

        upstream.release.set()
        thread.join(timeout=30)
        assert "error" not in outcome, outcome.get("error")
        assert len(outcome["result"].data) == 1  # type: ignore[attr-defined]
        assert gateway.process.wait(timeout=30) == 0
        output = gateway.output()
    assert '"status":200' in output and "draining" in output


def test_sigterm_past_the_drain_timeout_still_exits_0(
    held: tuple[HeldUpstream, str], tmp_path: Path
) -> None:
    upstream, upstream_url = held
    config = tmp_path / "gateway.yaml"
    config.write_text(
        (REPO / "config" / "gateway.yaml")
        .read_text()
        .replace("drain_timeout: 60", "drain_timeout: 1")
    )
    (tmp_path / "models.yaml").write_text((REPO / "config" / "models.yaml").read_text())
    env = gateway_env(upstream_url, GATEWAY_CONFIG=str(config))
    with gateway_process(env, tmp_path / "gateway.log") as gateway:
        thread, outcome = edit_in_background(gateway.url)
        assert upstream.arrived.wait(30)
        gateway.terminate()
        # The upstream never answers: the drain timeout, not the edit, ends the process.
        assert gateway.process.wait(timeout=30) == 0
        thread.join(timeout=30)
    assert "error" in outcome  # the client sees its connection end, it is not left hanging


def test_draining_gateway_fails_readyz_and_refuses_new_work(held: tuple[HeldUpstream, str]) -> None:
    _, upstream_url = held
    app = create_app(gateway_settings(upstream_url))
    with serve_in_thread(app) as url:
        auth = {"authorization": f"Bearer {CLIENT_KEY}"}
        assert httpx.get(url + "/readyz").status_code == 200
        app.state.drain.begin()
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "draining"
        assert httpx.get(url + "/healthz").status_code == 200  # alive, only leaving
        response = httpx.get(url + "/v1/models", headers=auth)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "gateway_draining"
        assert response.headers["connection"] == "close"
