"""Slow and broken clients: a stalled body is cut off with 408 and its connection closed; a client
that hangs up mid-upload or while the upstream works leaves no temp file or memory behind."""

from __future__ import annotations

import hashlib
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.main import create_app
from tests.conftest import CLIENT_KEY
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
from tests.support import images
from tests.support.servers import serve_in_thread

IDLE_TIMEOUT = 0.5


@pytest.fixture(scope="module")
def stall_gateway(fake_upstream: FakeOpenAIUpstream) -> Iterator[SmallGateway]:
    """A gateway that gives up on a silent body after IDLE_TIMEOUT seconds."""
    with tempfile.TemporaryDirectory(prefix="gw-spool-") as spool:
        settings = small_settings(
            fake_upstream.url,  # type: ignore[attr-defined]
            Path(spool),
            body_idle_timeout=IDLE_TIMEOUT,
            body_timeout=30,
        )
        with serve_in_thread(create_app(settings)) as url:
            yield SmallGateway(url, Path(spool), settings)


def edit_body(image: bytes) -> bytes:
    return mp.encode([mp.file("image", image), mp.text("prompt", "slow")])


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


def test_slow_client_disconnecting_while_upstream_works_lets_the_call_complete(
    stall_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    image = images.noise_png(300, 300)
    body = edit_body(image)
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
