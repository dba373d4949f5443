"""AiohttpTransport against real loopback servers that answer exactly as scripted: bodies and
keep-alive, the write and pool timeouts, the connection cap, TLS names, the response cap, and
the billing rule (only a failure before anything was sent may look like a connect failure)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import aiohttp
import httpx
import pytest

from app.config.settings import load_settings
from app.upstream.aiohttp_transport import AiohttpTransport, UpstreamPool
from app.wiring import open_http
from tests.support.constants import CONFIG
from tests.support.raw_upstream import RawUpstream, answering, reset

OK = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"data":[]}'
RETRIED = (httpx.ConnectError, httpx.ConnectTimeout)  # what app/routing/forwarder.py sends again


def client(
    max_connections: int = 8,
    keepalive_expiry: float = 30.0,
    max_response_bytes: int = 2**30,
    ssl_context: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    pool = UpstreamPool(
        max_connections=max_connections,
        keepalive_expiry=keepalive_expiry,
        ssl_context=ssl_context,
    )
    transport = AiohttpTransport(pool, max_response_bytes=max_response_bytes)
    return _Client(pool, transport=transport)


class _Client(httpx.AsyncClient):
    """Closes the pool with the client (the gateway closes them apart: the pool is shared)."""

    def __init__(self, pool: UpstreamPool, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.pool = pool

    async def aclose(self) -> None:
        await super().aclose()
        await self.pool.aclose()


def run(coro: Awaitable[object]) -> object:
    async def main() -> object:
        async with asyncio.timeout(60):
            return await coro

    return asyncio.run(main())  # type: ignore[arg-type]


def test_keep_alive_reuses_one_connection_and_bodies_arrive_intact() -> None:
    async def scenario() -> None:
        async with RawUpstream(answering(OK)) as upstream, client() as http:
            bodies = [os.urandom(size) for size in (0, 1, 70_000, 300_000, 3 * 2**20)]
            for body in bodies:
                response = await http.post(upstream.url + "/images/edits?x=1", content=body)
                assert response.status_code == 200
                assert response.json() == {"data": []}
            assert upstream.bodies == bodies
            assert upstream.connections == 1
            assert upstream.heads[0].startswith(b"POST /images/edits?x=1 HTTP/1.1\r\n")

    run(scenario())


def test_streamed_pieces_arrive_in_order_with_their_length_or_chunked() -> None:
    pieces = [b"head", os.urandom(100), os.urandom(300_000), b"", os.urandom(70_000), b"tail"]

    async def stream() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    async def scenario() -> None:
        async with RawUpstream(answering(OK)) as upstream, client() as http:
            length = str(sum(map(len, pieces)))
            await http.post(upstream.url, content=stream(), headers={"content-length": length})
            await http.post(upstream.url, content=stream())  # no length: chunked
            assert upstream.bodies == [b"".join(pieces)] * 2
            assert b"content-length: " + length.encode() in upstream.heads[0].lower()
            assert b"transfer-encoding: chunked" in upstream.heads[1].lower()

    run(scenario())


def test_chunked_and_close_delimited_answers_are_read_whole() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"6\r\nhello \r\n8\r\nchunked \r\n5\r\nworld\r\n0\r\n\r\n"
    )

    async def until_close(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + b"x" * 300_000)
        await writer.drain()

    async def scenario() -> None:
        async with client() as http:
            async with RawUpstream(answering(chunked)) as upstream:
                assert (await http.get(upstream.url)).content == b"hello chunked world"
            async with RawUpstream(until_close) as upstream:
                assert (await http.get(upstream.url)).content == b"x" * 300_000

    run(scenario())


def test_an_early_answer_stops_the_upload_and_is_returned() -> None:
    async def refuse_early(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"error":{"message":"too large"}}'
        writer.write(
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        await asyncio.sleep(0.5)

    async def slow_body() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"z" * 2**20
            await asyncio.sleep(0.01)

    async def scenario() -> None:
        async with RawUpstream(refuse_early) as upstream, client() as http:
            response = await http.post(
                upstream.url, content=slow_body(), headers={"content-length": str(64 * 2**20)}
            )
            assert response.status_code == 413
            assert response.reason_phrase == "Payload Too Large"
            assert response.json()["error"]["message"] == "too large"

    run(scenario())


def test_large_upload_to_a_slow_reader_arrives_intact() -> None:
    digest: list[str] = []

    async def slow_reader(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
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

    body = os.urandom(24 * 2**20)

    async def scenario() -> None:
        async with RawUpstream(slow_reader) as upstream, client() as http:
            assert (await http.post(upstream.url, content=body)).status_code == 200

    run(scenario())
    assert digest == [hashlib.sha256(body).hexdigest()]


def test_an_upstream_that_stops_reading_the_upload_is_a_write_timeout() -> None:
    async def never_reads(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        upstream.heads.append(b"POST")
        await asyncio.sleep(30)

    async def scenario() -> None:
        async with RawUpstream(never_reads) as upstream, client() as http:
            started = time.monotonic()
            with pytest.raises(httpx.WriteTimeout):
                await http.post(
                    upstream.url,
                    content=os.urandom(64 * 2**20),
                    timeout=httpx.Timeout(30.0, write=0.5),
                )
            assert time.monotonic() - started < 15  # the write timeout, not the read one

    run(scenario())


def test_silent_upstream_is_a_read_timeout_and_refused_port_a_connect_error() -> None:
    async def silent(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await upstream.read_request(reader)
        await asyncio.sleep(30)

    async def scenario() -> None:
        async with client() as http:
            async with RawUpstream(silent) as upstream:
                with pytest.raises(httpx.ReadTimeout):
                    await http.post(upstream.url, content=b"x", timeout=httpx.Timeout(0.3))
                closed_port = upstream.port
            with pytest.raises(httpx.ConnectError):
                await http.get(f"http://127.0.0.1:{closed_port}/")

    run(scenario())


def test_the_cap_queues_requests_and_raises_pool_timeout() -> None:
    async def slow_ok(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            await upstream.read_request(reader)
            await asyncio.sleep(0.2)
            writer.write(OK)
            await writer.drain()

    async def scenario() -> None:
        async with RawUpstream(slow_ok) as upstream, client(max_connections=1) as http:
            responses = await asyncio.gather(*(http.get(upstream.url) for _ in range(3)))
            assert [r.status_code for r in responses] == [200, 200, 200]
            assert upstream.connections == 1
            busy = asyncio.create_task(http.get(upstream.url))
            await asyncio.sleep(0.05)
            with pytest.raises(httpx.PoolTimeout):
                await http.get(upstream.url, timeout=httpx.Timeout(5.0, pool=0.05))
            assert (await busy).status_code == 200

    run(scenario())


@pytest.mark.parametrize("order", ["cancel-then-release", "release-then-cancel"])
def test_a_waiter_cancelled_as_the_connection_frees_passes_it_on(order: str) -> None:
    """max_connections=1: A holds the connection, B and C wait, A releases while B is cancelled
    in the same tick. C is served at once, not after its pool timeout (30 s here) beside an idle
    connection. (aiohttp's own connector limit loses that wake-up; the old transport did too.)"""
    release = asyncio.Event()
    served_after: list[float] = []

    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b" /hold " in head:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
                await writer.drain()
                await release.wait()
                writer.write(b"held")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nfast")
            await writer.drain()

    async def scenario() -> None:
        async with RawUpstream(script) as upstream, client(max_connections=1) as http:
            http.timeout = httpx.Timeout(30.0)
            a = await http.send(http.build_request("GET", upstream.url + "/hold"), stream=True)
            b = asyncio.create_task(http.get(upstream.url + "/b"))
            c = asyncio.create_task(http.get(upstream.url + "/c"))
            await asyncio.sleep(0.2)
            assert not b.done() and not c.done()
            release.set()
            assert await a.aread() == b"held"
            started = time.monotonic()
            if order == "cancel-then-release":
                b.cancel()
                await a.aclose()
            else:
                await a.aclose()
                b.cancel()
            response = await asyncio.wait_for(c, 25)
            served_after.append(time.monotonic() - started)
            assert response.text == "fast"
            assert b.cancelled()

    run(scenario())
    print(f"C served {served_after[0] * 1000:.2f} ms after the release")
    # Causal, not a latency figure: served long before the 30 s pool timeout could expire.
    assert served_after[0] < 2.0


def test_expired_idle_connection_is_not_reused() -> None:
    async def scenario() -> None:
        async with RawUpstream(answering(OK)) as upstream, client(keepalive_expiry=0.1) as http:
            await http.get(upstream.url)
            await asyncio.sleep(0.4)
            await http.get(upstream.url)
            assert upstream.connections == 2

    run(scenario())


@pytest.mark.parametrize("value", ["a\r\nx-injected: 1", "a\nb", "a\x00b"])
def test_a_header_that_could_split_the_request_is_refused_before_sending(value: str) -> None:
    async def scenario() -> None:
        async with RawUpstream(answering(OK)) as upstream, client() as http:
            with pytest.raises(httpx.LocalProtocolError):
                await http.get(upstream.url, headers={"x-note": value})
            assert upstream.connections == 0

    run(scenario())


def test_an_answer_over_the_cap_is_cut_off_as_an_error() -> None:
    async def endless(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await upstream.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (65536, b"z" * 65536)
        while True:  # until the client hangs up
            writer.write(piece)
            await writer.drain()

    declared = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (3 * 2**20) + b"z" * 3 * 2**20

    async def scenario() -> None:
        async with client(max_response_bytes=2 * 2**20) as http:
            async with RawUpstream(endless) as upstream:
                with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
                    await http.get(upstream.url)
            async with RawUpstream(answering(declared)) as upstream:
                with pytest.raises(httpx.RemoteProtocolError, match="larger than"):
                    await http.get(upstream.url)

    run(scenario())


def test_the_gateways_clients_never_send_a_cookie_an_answer_set() -> None:
    with_cookie = (
        b"HTTP/1.1 200 OK\r\nset-cookie: session=abc; Path=/\r\ncontent-length: 2\r\n\r\nok"
    )
    settings = load_settings(
        env={"GATEWAY_CONFIG": str(CONFIG), "GATEWAY_ALLOW_ANONYMOUS": "true"}, demo=True
    )

    async def scenario() -> None:
        http = open_http(settings)
        try:
            async with RawUpstream(answering(with_cookie)) as upstream:
                for client_ in (http.default, http.image_urls, http.default):
                    await client_.get(upstream.url)
            assert all(b"cookie" not in head.lower() for head in upstream.heads)
        finally:
            await http.aclose()

    run(scenario())


# The billing rule: once any byte of a request may have left, the failure is never one that
# app/routing/forwarder.py retries on another key.


async def _closes_unanswered(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await upstream.read_request(reader)


async def _resets_unanswered(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await upstream.read_request(reader)
    reset(writer)


async def _resets_mid_upload(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    upstream.heads.append(head)
    await reader.readexactly(100_000)
    reset(writer)


async def _answers_then_closes_on_the_next(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    # A kept-alive connection the upstream gives up on just as it is reused: the second request
    # reaches it, and the connection closes without an answer.
    await upstream.read_request(reader)
    writer.write(OK)
    await writer.drain()
    await reader.readuntil(b"\r\n\r\n")
    upstream.heads.append(b"POST (reused)")


@pytest.mark.parametrize(
    "script",
    [_closes_unanswered, _resets_unanswered, _resets_mid_upload, _answers_then_closes_on_the_next],
    ids=["closed-unanswered", "reset-unanswered", "reset-mid-upload", "stale-keep-alive"],
)
def test_a_failure_after_sending_is_never_a_retried_kind(script: object) -> None:
    async def scenario() -> None:
        async with RawUpstream(script) as upstream, client() as http:  # type: ignore[arg-type]
            outcomes: list[BaseException | int] = []
            for _ in range(2):
                try:
                    outcomes.append(
                        (await http.post(upstream.url, content=os.urandom(4 * 2**20))).status_code
                    )
                except httpx.TransportError as exc:
                    outcomes.append(exc)
                if isinstance(outcomes[-1], BaseException):
                    break
            failure = outcomes[-1]
            assert isinstance(failure, httpx.TransportError), outcomes
            assert not isinstance(failure, RETRIED), repr(failure)
            assert upstream.heads, "the request reached the upstream"

    run(scenario())


def test_aiohttp_errors_map_by_the_billing_rule() -> None:
    """The mapping on its own, for errors a loopback test cannot provoke at will. The
    `httpx-aiohttp` package maps ServerDisconnectedError to ConnectTimeout: a POST that reached
    the upstream would be sent again and billed twice."""
    from app.upstream.aiohttp_transport import _translated

    after_sending = [
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientPayloadError("cut"),
        aiohttp.ClientOSError(104, "reset"),
        aiohttp.ClientConnectionResetError("closing"),
        aiohttp.SocketTimeoutError("read"),
        aiohttp.ServerTimeoutError("read"),
        aiohttp.ClientConnectionError("lost"),
    ]
    for exc in after_sending:
        assert not isinstance(_translated(exc, "host:443"), RETRIED), exc
    assert isinstance(
        _translated(aiohttp.ConnectionTimeoutError("connect"), "h:1"), httpx.ConnectTimeout
    )


def test_https_verifies_the_certificate_for_the_pinned_name(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=upstream.test", "-addext", "subjectAltName=DNS:upstream.test",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(OK)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
        port = server.sockets[0].getsockname()[1]
        try:
            tls = ssl.create_default_context(cafile=str(cert))
            async with client(ssl_context=tls) as http:
                url = f"https://127.0.0.1:{port}/v1/models"
                # As url_guard pins it: connect to the vetted address, verify the checked name.
                pinned = await http.get(url, extensions={"sni_hostname": "upstream.test"})
                assert pinned.status_code == 200
                with pytest.raises(httpx.ConnectError):
                    await http.get(url, extensions={"sni_hostname": "other.test"})
                with pytest.raises(httpx.ConnectError):
                    await http.get(url)  # the address itself is not in the certificate
        finally:
            server.close()
            await server.wait_closed()

    run(scenario())
