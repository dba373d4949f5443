"""The server's HTTP protocol (app/http_protocol.py): a connection that does not deliver its
request headers in time, or sends too many of them, or is not HTTP at all, is answered in
OpenAI's envelope and closed; well-behaved connections, keep-alive included, are untouched."""

from __future__ import annotations

import contextlib
import hashlib
import socket
import time
from collections.abc import Iterator

import pytest

from app.http_protocol import GuardedHttpToolsProtocol
from app.main import create_app
from tests.conftest import CLIENT_KEY, gateway_settings
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening.raw_http import closed_by_peer, connect, head, read_response
from tests.support import images
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


def edit_request(image: bytes, prompt: str, extra_headers: dict[str, str] | None = None) -> bytes:
    boundary = "wire-" + hashlib.sha256(image).hexdigest()[:16]
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n{prompt}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {
        "Authorization": f"Bearer {CLIENT_KEY}",
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(len(body)),
        **(extra_headers or {}),
    }
    return head("POST", "/v1/images/edits", headers) + body


class BufferedReader:
    """Responses read one after another off one socket, bytes past each one kept."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.data = b""

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        self.data += chunk

    def response(self) -> tuple[int, bytes]:
        while b"\r\n\r\n" not in self.data:
            self._fill()
        raw_head, _, self.data = self.data.partition(b"\r\n\r\n")
        status = int(raw_head.split(b" ", 2)[1])
        length = 0
        for line in raw_head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self.data) < length:
            self._fill()
        body, self.data = self.data[:length], self.data[length:]
        return status, body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_http_protocol_pipelined_edits_are_answered_in_order(
    guarded_url: str, upstream: FakeOpenAIUpstream
) -> None:
    first, second = images.noise_png(300, 300, seed=7), images.noise_png(200, 200, seed=8)
    with connect(guarded_url) as sock:
        # Both requests in one write: the second body arrives while the first is in the app.
        sock.sendall(edit_request(first, "one") + edit_request(second, "two") + models_request())
        reader = BufferedReader(sock)
        statuses = [reader.response()[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert [(e.field_map()["prompt"], e.files[0].sha256) for e in upstream.edits] == [
        ("one", sha(first)),
        ("two", sha(second)),
    ]


def test_http_protocol_expect_100_continue_gets_continue_then_answer(
    guarded_url: str, upstream: FakeOpenAIUpstream
) -> None:
    # curl sends `Expect: 100-continue` for any body over 1 KB and waits for the go-ahead.
    image = images.noise_png(256, 256, seed=9)
    request = edit_request(image, "continue", {"Expect": "100-continue"})
    request_head, _, body = request.partition(b"\r\n\r\n")
    with connect(guarded_url) as sock:
        sock.sendall(request_head + b"\r\n\r\n")
        reader = BufferedReader(sock)
        assert reader.response()[0] == 100
        sock.sendall(body)
        status, _ = reader.response()
    assert status == 200
    assert [e.files[0].sha256 for e in upstream.edits] == [sha(image)]


def test_http_protocol_body_trickled_in_small_pieces_arrives_whole(
    guarded_url: str, upstream: FakeOpenAIUpstream
) -> None:
    image = images.noise_png(300, 300, seed=10)
    request = edit_request(image, "trickle")
    with connect(guarded_url) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(request), 4096):
            sock.sendall(request[start : start + 4096])
            if start % (64 * 4096) == 0:
                time.sleep(0.005)
        status, _ = BufferedReader(sock).response()
    assert status == 200
    assert [e.files[0].sha256 for e in upstream.edits] == [sha(image)]
