"""Acceptance 4 (issue 18): SIGTERM drains. The edits in flight finish with 200, every new request
from then on is refused (connection refused, or 503 with `connection: close`) at once, the process
exits soon after the last edit, and nothing the drain does logs a traceback or records a 500.
Past the drain limit, what is still running is answered 503 `gateway_shutdown`, not cancelled.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply, images_response
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_env import gateway_env, gateway_settings
from tests.support.gateway_process import GatewayProcess, gateway_process
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

# Each edit takes this long upstream: the drain has to wait for it.
LATENCY = 2.5
EDITS = 10
# A new request must be turned away within this (acceptance 4); refusals take milliseconds.
REFUSED_WITHIN = 1.0
PNG = images.png(32, 32)


class SlowUpstream:
    """Answers every edit and generation after `latency` seconds; None holds until `release`."""

    def __init__(self, latency: float | None) -> None:
        self.latency = latency
        self.release = threading.Event()
        self._lock = threading.Lock()
        self.arrived = 0
        self.app = Starlette(
            routes=[
                Route(f"/v1/images/{kind}", self._answer, methods=["POST"])
                for kind in ("edits", "generations")
            ]
        )

    async def _answer(self, request: Request) -> Response:
        await request.body()
        with self._lock:
            self.arrived += 1
        if self.latency is not None:
            await asyncio.sleep(self.latency)
        else:
            for _ in range(3000):  # bounded: 60 s at most
                if self.release.is_set():
                    break
                await asyncio.sleep(0.02)
        return JSONResponse(images_response(1))


@pytest.fixture
def slow() -> Iterator[tuple[SlowUpstream, str]]:
    upstream = SlowUpstream(LATENCY)
    with serve_in_thread(upstream.app) as url:
        yield upstream, url + "/v1"


@pytest.fixture
def held() -> Iterator[tuple[SlowUpstream, str]]:
    upstream = SlowUpstream(None)
    with serve_in_thread(upstream.app) as url:
        try:
            yield upstream, url + "/v1"
        finally:
            upstream.release.set()


@dataclass
class Edit:
    """One edit on its own thread, through the SDK; `result` or `error` once it ends."""

    url: str
    prompt: str
    result: object = None
    error: Exception | None = None
    ended_at: float | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        client = sdk_client(self.url, timeout=60)
        try:
            self.result = client.images.edit(image=("a.png", PNG, "image/png"), prompt=self.prompt)
        except Exception as exc:
            self.error = exc
        self.ended_at = time.monotonic()


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def workers_started(gateway: GatewayProcess, workers: int) -> bool:
    return gateway.output().count("Application startup complete") >= workers


def workers_draining(gateway: GatewayProcess, workers: int) -> bool:
    return gateway.output().count('"msg":"draining:') >= workers


def access_lines(output: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    return [line for line in lines if line.get("logger") == "gateway.access"]


# --- what a client opening new requests during the drain sees -------------------------------------


def new_request(kind: str, url: str, kept: httpx.Client) -> tuple[str, float]:
    """One brand-new request; its outcome ("refused", "503" or what else it got) and duration."""
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    sdk = sdk_client(url, timeout=10)
    started = time.monotonic()
    try:
        if kind == "healthz":
            status = httpx.get(url + "/healthz", timeout=10).status_code
        elif kind == "readyz":
            status = httpx.get(url + "/readyz", timeout=10).status_code
        elif kind == "kept-alive":
            # A connection opened before the signal, reused for new work.
            status = kept.get(url + "/v1/models", headers=auth).status_code
        elif kind == "edit":
            sdk.images.edit(image=("a.png", PNG, "image/png"), prompt="new after sigterm")
            status = 200
        else:
            sdk.images.generate(prompt="new after sigterm")
            status = 200
    except (httpx.TransportError, openai.APIConnectionError):
        return "refused", time.monotonic() - started
    except openai.APIStatusError as exc:
        status = exc.status_code
        if status == 503:
            assert exc.response.headers["connection"] == "close"
            assert "retry-after" in exc.response.headers
            assert exc.code == "gateway_draining"
    return ("503" if status == 503 else f"status {status}"), time.monotonic() - started


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_finishes_edits_in_flight_and_refuses_every_new_request(
    slow: tuple[SlowUpstream, str], tmp_path: Path, workers: int
) -> None:
    upstream, upstream_url = slow
    log = tmp_path / "gateway.log"
    with gateway_process(gateway_env(upstream_url), log, workers=workers) as gateway:
        assert wait_until(lambda: workers_started(gateway, workers), 30), gateway.output()
        kept = httpx.Client(timeout=10)
        assert kept.get(gateway.url + "/healthz").status_code == 200
        edits = [Edit(gateway.url, f"in flight {i}") for i in range(EDITS)]
        assert wait_until(lambda: upstream.arrived == EDITS, 30), "the edits never all arrived"

        signalled = time.monotonic()
        gateway.terminate()
        exited: list[float] = []
        waiter = threading.Thread(
            target=lambda: (gateway.process.wait(60), exited.append(time.monotonic()))
        )
        waiter.start()
        # Every worker says it is draining (with --workers, after the parent shut the socket):
        # from here on nothing new may get in.
        assert wait_until(lambda: workers_draining(gateway, workers), REFUSED_WITHIN), (
            "the drain did not begin at once"
        )
        seen: list[tuple[str, str, float]] = []
        kinds = ("healthz", "readyz", "edit", "generation", "kept-alive")
        while not exited and time.monotonic() - signalled < LATENCY + 10:
            kind = kinds[len(seen) % len(kinds)]
            outcome, took = new_request(kind, gateway.url, kept)
            seen.append((kind, outcome, took))
            time.sleep(0.05)
        waiter.join(timeout=60)
        kept.close()
        for edit in edits:
            edit.thread.join(timeout=30)
        output = gateway.output()

    assert [e.error for e in edits] == [None] * EDITS
    assert all(len(e.result.data) == 1 for e in edits)  # type: ignore[attr-defined]
    assert len(seen) >= len(kinds), seen  # the drain lasted long enough to try every kind
    for kind, outcome, took in seen:
        assert outcome in ("refused", "503"), (kind, outcome, seen)
        assert took < REFUSED_WITHIN, (kind, outcome, took)
    assert gateway.process.returncode == 0
    assert exited, "the gateway did not exit"
    # The in-flight edits had at most LATENCY left when the signal came.
    last_edit = max(e.ended_at for e in edits if e.ended_at is not None)
    assert exited[0] - signalled <= LATENCY + 2, exited[0] - signalled
    assert exited[0] - last_edit <= 2, exited[0] - last_edit
    assert "Traceback" not in output
    statuses = [line["status"] for line in access_lines(output)]
    assert statuses.count(200) >= EDITS and 500 not in statuses


def test_sigterm_past_the_drain_limit_answers_503_without_a_traceback(
    held: tuple[SlowUpstream, str], tmp_path: Path
) -> None:
    upstream, upstream_url = held
    config = write_gateway_config(
        tmp_path, shutdown={"drain_timeout": 1}, retry={"max_attempts": 1}
    )
    env = gateway_env(upstream_url, GATEWAY_CONFIG=str(config))
    with gateway_process(env, tmp_path / "gateway.log") as gateway:
        edit = Edit(gateway.url, "never answered upstream")
        assert wait_until(lambda: upstream.arrived == 1, 30)
        signalled = time.monotonic()
        gateway.terminate()
        # The upstream never answers: the drain limit, not the edit, ends the process.
        assert gateway.process.wait(timeout=30) == 0
        took = time.monotonic() - signalled
        edit.thread.join(timeout=30)
        output = gateway.output()
    assert took <= 1 + 2, took
    assert isinstance(edit.error, openai.APIStatusError), edit.error
    assert edit.error.status_code == 503 and edit.error.code == "gateway_shutdown"
    assert edit.error.response.headers["connection"] == "close"
    assert "Traceback" not in output and "Exception in ASGI application" not in output
    (line,) = [line for line in access_lines(output) if line["route"] == "/v1/images/edits"]
    assert line["status"] == 503 and line["error_code"] == "gateway_shutdown"


# --- in one process: what draining answers --------------------------------------------------------


def test_draining_gateway_answers_probes_and_new_work_503_with_connection_close(
    held: tuple[SlowUpstream, str],
) -> None:
    _, upstream_url = held
    app = create_app(gateway_settings(upstream_url))
    with serve_in_thread(app) as url:
        auth = {"authorization": f"Bearer {CLIENT_KEY}"}
        assert httpx.get(url + "/readyz").status_code == 200
        assert httpx.get(url + "/healthz").status_code == 200
        app.state.drain.begin()
        for probe in ("/readyz", "/healthz"):
            answer = httpx.get(url + probe)
            assert answer.status_code == 503 and answer.json() == {"status": "draining"}
            assert answer.headers["connection"] == "close"
        response = httpx.get(url + "/v1/models", headers=auth)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "gateway_draining"
        assert response.json()["error"]["type"] == "server_error"
        assert response.headers["connection"] == "close"
        assert response.headers["retry-after"] == "1"


def test_stream_still_running_at_the_drain_limit_ends_with_an_error_event(
    fake_upstream: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    gate = threading.Event()
    fake_upstream.reset()
    fake_upstream.enqueue(Reply(stream_gates=[gate], gate_timeout=30))
    config = write_gateway_config(
        tmp_path, shutdown={"drain_timeout": 0.5}, cache={"enabled": False}
    )
    settings = gateway_settings(fake_upstream.url, GATEWAY_CONFIG=str(config))
    app = create_app(settings)
    try:
        with serve_in_thread(app) as url:
            client = sdk_client(url)
            stream = client.images.edit(
                image=("a.png", PNG, "image/png"), prompt="a hat", stream=True, partial_images=1
            )
            seen: list[str] = []
            with pytest.raises(openai.APIError) as caught:
                for event in stream:
                    seen.append(event.type)
                    app.state.drain.begin()  # the upstream holds the rest past the limit
    finally:
        gate.set()
        fake_upstream.reset()
    assert seen == ["image_edit.partial_image"]
    assert "shut down" in caught.value.message
