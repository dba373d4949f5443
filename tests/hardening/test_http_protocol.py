"""The server's HTTP protocol (app/http_protocol.py): a connection that does not deliver its
request headers in time, or sends too many of them, or is not HTTP at all, is answered in
OpenAI's envelope and closed; well-behaved connections, keep-alive included, are untouched."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import pytest

from app.http_protocol import GuardedHttpToolsProtocol
from app.main import create_app
from tests.conftest import CLIENT_KEY, gateway_settings
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening.raw_http import closed_by_peer, connect, head, read_response
from tests.support.servers import serve_in_thread


class QuickHeaderTimeout(GuardedHttpToolsProtocol):
    header_timeout = 0.5
    max_header_bytes = 8 * 1024


@pytest.fixture(scope="module")
def guarded_url(fake_upstream: FakeOpenAIUpstream) -> Iterator[str]:
    settings = gateway_settings(fake_upstream.url)  # type: ignore[attr-defined]
    with serve_in_thread(create_app(settings), http=QuickHeaderTimeout) as url:
        yield url


def models_request() -> bytes:
    return head("GET", "/v1/models", {"Authorization": f"Bearer {CLIENT_KEY}"})


def refused(sock: socket.socket, status: int, code: str) -> None:
    response = read_response(sock)
    assert response.status == status
    assert response.headers["connection"] == "close"
    error = response.json()["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert closed_by_peer(sock)


def test_http_protocol_silent_connection_gets_408_and_is_closed(guarded_url: str) -> None:
    with connect(guarded_url) as sock:
        refused(sock, 408, "request_timeout")


def test_http_protocol_trickled_headers_get_408(guarded_url: str) -> None:
    with connect(guarded_url) as sock:
        sock.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: gw\r\nX-Slow: a")
        refused(sock, 408, "request_timeout")


def test_http_protocol_stalled_second_request_on_keep_alive_gets_408(guarded_url: str) -> None:
    with connect(guarded_url) as sock:
        sock.sendall(models_request())
        assert read_response(sock).status == 200
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
        refused(sock, 408, "request_timeout")


def test_http_protocol_oversized_headers_get_431(guarded_url: str) -> None:
    with connect(guarded_url) as sock:
        filler = b"X-Filler: " + b"a" * 1000 + b"\r\n"
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n" + filler * 20)
        refused(sock, 431, "headers_too_large")


def test_http_protocol_one_huge_header_line_gets_431(guarded_url: str) -> None:
    with connect(guarded_url) as sock:
        # Refused before all of it is sent: the refusal is then already waiting to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nX-Huge: " + b"a" * (1024 * 1024))
        refused(sock, 431, "headers_too_large")


def test_http_protocol_garbage_gets_400_in_the_envelope(guarded_url: str) -> None:
    with connect(guarded_url) as sock:
        sock.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n")
        refused(sock, 400, "invalid_http")


def test_http_protocol_keep_alive_requests_pass(guarded_url: str) -> None:
    with connect(guarded_url) as sock:
        for _ in range(3):
            sock.sendall(models_request())
            response = read_response(sock)
            assert response.status == 200
            assert response.json()["object"] == "list"
