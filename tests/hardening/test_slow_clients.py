"""Slow and broken clients: a stalled body is cut off with 408 and its connection closed; a client
that hangs up mid-upload or while the upstream works leaves no temp file or memory behind."""

from __future__ import annotations

import hashlib
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import InternalServerError

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.hardening import multipart as mp
from tests.hardening.conftest import SmallGateway, small_settings
from tests.hardening.raw_http import (
    closed_by_peer,
    connect,
    head,
    live_uploads,
    read_response,
    spool_fds,
    wait_until,
)
from tests.support import images, prom
from tests.support.constants import CLIENT_KEY
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

IDLE_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def stall_gateway(fake_upstream: FakeOpenAIUpstream) -> Iterator[SmallGateway]:
    """A gateway that gives up on a silent body after IDLE_TIMEOUT seconds."""
    with tempfile.TemporaryDirectory(prefix="gw-spool-") as spool:
        settings = small_settings(
            fake_upstream.url,
            Path(spool),
            body_idle_timeout=IDLE_TIMEOUT,
            body_timeout=30,
        )
        # The result cache on (in-process store): an abandoned paid call must still be kept.
        settings = settings.model_copy(
            update={"cache": settings.cache.model_copy(update={"enabled": True})}
        )
        with serve_in_thread(create_app(settings)) as url:
            yield SmallGateway(url, Path(spool), settings)


def edit_body(image: bytes, prompt: str = "slow") -> bytes:
    return mp.encode([mp.file("image", image), mp.text("prompt", prompt)])


def edit_head(length: int) -> bytes:
    return head(
        "POST",
        "/v1/images/edits",
        {
            "Authorization": f"Bearer {CLIENT_KEY}",
            "Content-Type": mp.content_type(),
            "Content-Length": str(length),
        },
    )


def healthy(url: str) -> bool:
    return httpx.get(url + "/healthz", timeout=10).status_code == 200


def in_flight(url: str) -> float:
    scrape = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert scrape.status_code == 200
    return prom.total(scrape.text, "gateway_requests_in_flight")


def test_slow_client_stalling_mid_body_gets_408_and_the_connection_closed(
    stall_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    body = edit_body(images.noise_png(300, 300))  # ~270 KB: spooled to disk past 64 KiB
    with connect(stall_gateway.url) as sock:
        sock.sendall(edit_head(len(body)) + body[: len(body) // 2])
        assert wait_until(lambda: len(spool_fds(stall_gateway.spool_dir)) == 1)
        response = read_response(sock)  # the client now stalls; the gateway must give up
        assert response.status == 408
        assert response.headers["connection"] == "close"
        error = response.json()["error"]
        assert isinstance(error, dict) and error["code"] == "request_timeout"
        assert error["type"] == "invalid_request_error"
        assert closed_by_peer(sock)
    assert spool_fds(stall_gateway.spool_dir) == []
    assert live_uploads() == 0
    assert upstream.edits == []
    assert healthy(stall_gateway.url)
    assert wait_until(lambda: in_flight(stall_gateway.url) == 0)


def test_slow_client_sending_headers_only_gets_408(
    stall_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    with connect(stall_gateway.url) as sock:
        sock.sendall(edit_head(100_000))
        response = read_response(sock)
        assert response.status == 408
        assert closed_by_peer(sock)
    assert upstream.edits == []


def test_slow_client_disconnecting_mid_upload_leaves_nothing_behind(
    stall_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    body = edit_body(images.noise_png(300, 300))
    sock = connect(stall_gateway.url)
    sock.sendall(edit_head(len(body)) + body[: len(body) * 2 // 3])
    assert wait_until(lambda: len(spool_fds(stall_gateway.spool_dir)) == 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()  # an abortive close (RST), as a crashed client would
    assert wait_until(lambda: spool_fds(stall_gateway.spool_dir) == [])
    assert wait_until(lambda: live_uploads() == 0)
    assert list(stall_gateway.spool_dir.iterdir()) == []
    assert upstream.edits == []
    assert healthy(stall_gateway.url)
    assert wait_until(lambda: in_flight(stall_gateway.url) == 0)


def test_slow_client_disconnecting_while_upstream_works_lets_the_call_complete(
    stall_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    image = images.noise_png(300, 300, seed=7)
    prompt = "abandoned " + uuid.uuid4().hex
    body = edit_body(image, prompt)
    upstream.enqueue(Reply(delay=1.0))
    sock = connect(stall_gateway.url)
    sock.sendall(edit_head(len(body)) + body)
    assert wait_until(lambda: len(upstream.edits) == 1)
    sock.close()  # the client gives up while the upstream is still working
    # The upstream call runs to its end and the gateway then lets go of the upload.
    assert wait_until(lambda: spool_fds(stall_gateway.spool_dir) == [])
    assert wait_until(lambda: live_uploads() == 0)
    (sent,) = upstream.edits
    assert sent.files[0].sha256 == hashlib.sha256(image).hexdigest()
    assert healthy(stall_gateway.url)
    assert wait_until(lambda: in_flight(stall_gateway.url) == 0)
    # The paid answer was kept: the same edit again is served without a second upstream call.
    client = sdk_client(stall_gateway.url)
    again = client.images.with_raw_response.edit(
        image=("again.png", image, "image/png"), prompt=prompt
    )
    assert again.headers["x-cache"] == "hit"
    assert len(again.parse().data) == 1
    assert len(upstream.edits) == 1


@pytest.fixture(scope="module")
def one_slot_gateway(fake_upstream: FakeOpenAIUpstream) -> Iterator[SmallGateway]:
    """A gateway admitting one request at a time: a stalled client holds its only slot."""
    with tempfile.TemporaryDirectory(prefix="gw-spool-") as spool:
        settings = small_settings(
            fake_upstream.url,
            Path(spool),
            body_idle_timeout=IDLE_TIMEOUT,
            max_in_flight=1,
        )
        with serve_in_thread(create_app(settings)) as url:
            yield SmallGateway(url, Path(spool), settings)


def test_slow_client_stalled_body_frees_its_slot_at_the_idle_timeout(
    one_slot_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    url = one_slot_gateway.url
    client = sdk_client(url)
    image = ("a.png", images.png(64, 64), "image/png")
    with connect(url) as sock:
        body = edit_body(images.png(64, 64))
        sock.sendall(edit_head(len(body)) + body[:100])
        assert wait_until(lambda: in_flight(url) == 1)
        with pytest.raises(InternalServerError) as busy:
            client.images.edit(image=image, prompt="while the slot is held")
        assert busy.value.status_code == 503
        assert read_response(sock).status == 408
    result = client.images.edit(image=image, prompt="after the stalled client was cut off")
    assert len(result.data) == 1
    assert len(upstream.edits) == 1
