"""Http1Transport against real loopback servers that answer exactly as scripted: framing,
keep-alive, failures mapped to httpx's exceptions, flow control, the connection limit, TLS."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from app.upstream.transport import MAX_HEAD_BYTES, Http1Transport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"data":[]}'


class Server:
    """A loopback server running one handler per connection; counts connections and keeps what
    each request sent."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=2**20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the test is over
        finally:
            writer.close()
            self._handlers.discard(task)

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        """One request's body (Content-Length or chunked), its head kept in self.heads."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        lines = head.decode("latin-1").lower().split("\r\n")
        length = next(
            (int(line.split(":")[1]) for line in lines if line.startswith("content-length:")), None
        )
        if length is not None:
            body = await reader.readexactly(length)
        elif any(line.startswith("transfer-encoding:") and "chunked" in line for line in lines):
            pieces = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                pieces.append(await reader.readexactly(size))
                await reader.readexactly(2)
                if size == 0:
                    break
            body = b"".join(pieces)
        else:
            body = b""
        self.bodies.append(body)
        return body


def transport(**overrides: float) -> Http1Transport:
    options: dict[str, float] = {
        "max_connections": 8,
        "max_keepalive_connections": 8,
        "keepalive_expiry": 30.0,
    }
    options.update(overrides)
    extra = (
        {"max_response_bytes": int(options["max_response_bytes"])}
        if "max_response_bytes" in options
        else {}
    )
    return Http1Transport(
        max_connections=int(options["max_connections"]),
        max_keepalive_connections=int(options["max_keepalive_connections"]),
        keepalive_expiry=options["keepalive_expiry"],
        **extra,
    )


def run(coro: Awaitable[object]) -> object:
    async def main() -> object:
        async with asyncio.timeout(30):
            return await coro

    return asyncio.run(main())  # type: ignore[arg-type]


def test_keep_alive_reuses_one_connection_and_bodies_arrive_intact() -> None:
    server: Server

    async def answer_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(OK)
            await writer.drain()

    async def scenario() -> None:
        nonlocal server
        pool = transport()
        async with Server(answer_forever) as server, httpx.AsyncClient(transport=pool) as client:
            bodies = [os.urandom(size) for size in (0, 1, 70_000, 3 * 2**20)]
            for body in bodies:
                response = await client.post(server.url + "/images/edits?x=1", content=body)
                assert response.status_code == 200
                assert response.json() == {"data": []}
            assert server.bodies == bodies
            assert server.connections == 1
            assert server.heads[0].startswith(b"POST /images/edits?x=1 HTTP/1.1\r\n")
            assert pool.connections == (1, 1)

    run(scenario())


def test_a_kept_alive_connection_starts_every_request_afresh() -> None:
    # Hundreds of responses whose heads add up to far more than one head may be, and responses
    # closed unread, all on one connection.
    filler = b"x-filler: " + b"f" * 500 + b"\r\n"
    server: Server

    async def numbered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = 0
        while True:
            await server.read_request(reader)
            count += 1
            body = b"%d" % count
            writer.write(
                b"HTTP/1.1 200 OK\r\n" + filler + b"content-length: %d\r\n\r\n" % len(body) + body
            )
            await writer.drain()

    async def scenario() -> None:
        nonlocal server
        async with Server(numbered) as server, httpx.AsyncClient(transport=transport()) as client:
            for count in range(1, 301):
                if count % 3:
                    assert (await client.get(server.url)).content == b"%d" % count
                else:
                    async with client.stream("GET", server.url) as response:
                        assert response.status_code == 200
                        await asyncio.sleep(0.001)  # its body arrives, nobody reads it
            assert server.connections == 1

    run(scenario())


def test_streamed_request_bodies_go_chunked_and_chunked_responses_are_joined() -> None:
    server: Server

    async def chunked_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in (b"hello ", b"chunked ", b"world"):
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def pieces() -> AsyncIterator[bytes]:
        for piece in (b"a" * 10, b"", b"b" * 100_000):
            yield piece

    async def scenario() -> None:
        nonlocal server
        async with Server(chunked_answer) as server:
            async with httpx.AsyncClient(transport=transport()) as client:
                response = await client.post(server.url, content=pieces())
            assert response.content == b"hello chunked world"
            assert server.bodies == [b"a" * 10 + b"b" * 100_000]
            assert b"transfer-encoding: chunked" in server.heads[0].lower()

    run(scenario())


def test_a_body_without_length_ends_when_the_upstream_closes() -> None:
    async def close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"x" * 300_000)
        await writer.drain()

    server = Server(close_delimited)

    async def scenario() -> None:
        pool = transport()
        async with server, httpx.AsyncClient(transport=pool) as client:
            response = await client.get(server.url)
            assert response.content == b"x" * 300_000
            assert pool.connections == (0, 0)

    run(scenario())


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b"", httpx.RemoteProtocolError),  # closed without a response
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", httpx.RemoteProtocolError),
        (b"NOT HTTP AT ALL\r\n\r\n", httpx.RemoteProtocolError),
        (
            b"HTTP/1.1 200 OK\r\n" + b"x-filler: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n",
            httpx.RemoteProtocolError,
        ),
    ],
    ids=["no-response", "truncated-body", "malformed", "huge-head"],
)
def test_broken_answers_raise_transport_errors_and_free_the_connection(
    answer: bytes, expected: type[Exception]
) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(answer)
        await writer.drain()

    server = Server(broken)

    async def scenario() -> None:
        pool = transport()
        async with server, httpx.AsyncClient(transport=pool) as client:
            with pytest.raises(expected):
                await client.post(server.url, content=b"payload")
            await asyncio.sleep(0.05)
            assert pool.connections == (0, 0)

    run(scenario())


def test_refused_connection_is_a_connect_error() -> None:
    async def scenario() -> None:
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        pool = transport()
        async with httpx.AsyncClient(transport=pool) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{port}/")
        assert pool.connections == (0, 0)

    run(scenario())


def test_silent_upstream_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    server = Server(silent)

    async def scenario() -> None:
        pool = transport()
        async with server, httpx.AsyncClient(transport=pool) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(server.url, content=b"x", timeout=httpx.Timeout(0.3))
            assert pool.connections == (0, 0)

    run(scenario())


def test_an_early_answer_stops_the_upload_and_is_returned() -> None:
    async def refuse_early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error":{"message":"too large"}}'
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        await asyncio.sleep(0.2)

    server = Server(refuse_early)

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"z" * 2**20
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        pool = transport()
        async with server, httpx.AsyncClient(transport=pool) as client:
            response = await client.post(
                server.url, content=slow_body(), headers={"content-length": str(64 * 2**20)}
            )
            assert response.status_code == 413
            assert response.reason_phrase == "Payload Too Large"
            assert response.json()["error"]["message"] == "too large"
            await asyncio.sleep(0.05)
            assert pool.connections == (0, 0)  # never reused after an unfinished upload

    run(scenario())


def test_large_upload_to_a_slow_reader_respects_flow_control() -> None:
    digest: list[str] = []

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        sha = hashlib.sha256()
        while length:
            piece = await reader.read(min(length, 65536))
            sha.update(piece)
            length -= len(piece)
            await asyncio.sleep(0.001)
        digest.append(sha.hexdigest())
        writer.write(OK)
        await writer.drain()

    server = Server(slow_reader)
    body = os.urandom(24 * 2**20)

    async def scenario() -> None:
        async with server, httpx.AsyncClient(transport=transport()) as client:
            response = await client.post(server.url, content=body)
            assert response.status_code == 200

    run(scenario())
    assert digest == [hashlib.sha256(body).hexdigest()]


def test_connection_limit_queues_requests_and_pool_timeout_is_raised() -> None:
    async def slow_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            await asyncio.sleep(0.2)
            writer.write(OK)
            await writer.drain()

    server = Server(slow_ok)

    async def scenario() -> None:
        pool = transport(max_connections=1)
        async with server, httpx.AsyncClient(transport=pool) as client:
            responses = await asyncio.gather(*(client.get(server.url) for _ in range(3)))
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert server.connections == 1
            busy = asyncio.create_task(client.get(server.url))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await client.get(server.url, timeout=httpx.Timeout(5.0, pool=0.05))
            assert (await busy).status_code == 200

    run(scenario())


def test_idle_connection_closed_by_the_upstream_is_replaced() -> None:
    async def one_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(OK)
        await writer.drain()
        await asyncio.sleep(0.05)  # then closes, as an upstream's idle timeout would

    server = Server(one_then_close)

    async def scenario() -> None:
        pool = transport()
        async with server, httpx.AsyncClient(transport=pool) as client:
            assert (await client.get(server.url)).status_code == 200
            await asyncio.sleep(0.2)
            assert pool.connections == (0, 0)
            assert (await client.get(server.url)).status_code == 200
            assert server.connections == 2

    run(scenario())


def test_expired_idle_connection_is_not_reused() -> None:
    async def answer_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.read_request(reader)
            writer.write(OK)
            await writer.drain()

    server = Server(answer_forever)

    async def scenario() -> None:
        async with server, httpx.AsyncClient(transport=transport(keepalive_expiry=0.1)) as client:
            await client.get(server.url)
            await asyncio.sleep(0.2)
            await client.get(server.url)
            assert server.connections == 2

    run(scenario())


def test_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)

    server = Server(record)

    async def scenario() -> None:
        async with server, httpx.AsyncClient(transport=transport()) as client:
            with pytest.raises(httpx.LocalProtocolError):
                await client.get(server.url, headers={"x-note": "a\r\nx-injected: 1"})
            assert server.connections == 0

    run(scenario())


def test_informational_answer_precedes_the_real_one() -> None:
    async def continue_then_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
        await writer.drain()

    server = Server(continue_then_ok)

    async def scenario() -> None:
        async with server, httpx.AsyncClient(transport=transport()) as client:
            response = await client.post(server.url, content=b"x")
            assert (response.status_code, response.content) == (200, b'{"data":[]}')

    run(scenario())


def test_cancelled_request_closes_its_connection() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        await asyncio.sleep(5)

    server = Server(silent)

    async def scenario() -> None:
        pool = transport()
        async with server, httpx.AsyncClient(transport=pool) as client:
            task = asyncio.create_task(client.post(server.url, content=b"x"))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.connections == (0, 0)

    run(scenario())


def test_https_verifies_the_certificate_for_the_pinned_name(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=upstream.test",
            "-addext",
            "subjectAltName=DNS:upstream.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(OK)
        await writer.drain()

    async def scenario() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        try:
            pool = Http1Transport(
                max_connections=4,
                max_keepalive_connections=4,
                keepalive_expiry=5,
                ssl_context=client_tls,
            )
            async with httpx.AsyncClient(transport=pool) as client:
                url = f"https://127.0.0.1:{port}/v1/models"
                # As url_guard pins it: connect to the vetted address, verify the checked name.
                pinned = await client.get(url, extensions={"sni_hostname": "upstream.test"})
                assert pinned.status_code == 200
                with pytest.raises(httpx.ConnectError):
                    await client.get(url, extensions={"sni_hostname": "other.test"})
        finally:
            server.close()
            await server.wait_closed()

    run(scenario())


def test_endless_response_is_cut_off_at_the_cap() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
        while True:  # until the client hangs up
            writer.write(piece)
            await writer.drain()

    server = Server(endless)

    async def scenario() -> None:
        pool = transport(max_response_bytes=2 * 2**20)
        async with server, httpx.AsyncClient(transport=pool) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
                await client.get(server.url)
            await asyncio.sleep(0.05)
            assert pool.connections == (0, 0)

    run(scenario())
