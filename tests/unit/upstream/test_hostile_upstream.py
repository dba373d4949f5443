"""The project's transport against a hostile or broken upstream, beside a reference client
(httpx's own default transport) facing the same raw bytes: the same outcome for every case (the
same body, or an error of the same family), except where the table below says why not.

Outcome families follow what the gateway does with them: `connect` errors are retried on another
key (app/routing/forwarder.py), `timeout` ones answer 504, `network` and `protocol` ones 502.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest

from app.upstream.aiohttp_transport import AiohttpTransport, UpstreamPool
from tests.support.raw_upstream import RawUpstream, Script, answering, reset

OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
READ_TIMEOUT = 1.0

Outcome = tuple[str, ...]


def family(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        return "connect"
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    if isinstance(exc, httpx.NetworkError):
        return "network"
    if isinstance(exc, httpx.ProtocolError):
        return "protocol"
    raise AssertionError(f"unexpected {exc!r}")


def ok(body: bytes, status: int = 200) -> Outcome:
    return ("ok", str(status), body.decode())


def error(kind: str) -> Outcome:
    return ("error", kind)


@dataclass(frozen=True)
class Case:
    id: str
    script: Script
    method: str = "POST"
    # Requests sent one after the other (the later ones show what became of the connection).
    requests: int = 1
    # Where the project's transport answers differently on purpose, or by a known aiohttp
    # behaviour: why, what the reference gives, and what ours gives.
    differs: str = ""
    reference: tuple[Outcome, ...] = ()
    ours: tuple[Outcome, ...] = ()


def _then(*steps: Callable[[asyncio.StreamWriter], Awaitable[None] | None]) -> Script:
    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await upstream.read_request(reader)
        for step in steps:
            result = step(writer)
            if result is not None:
                await result
        await writer.drain()
        await asyncio.sleep(READ_TIMEOUT * 3)  # left open: the client decides

    return script


def _write(data: bytes) -> Callable[[asyncio.StreamWriter], None]:
    return lambda writer: writer.write(data)


def _pause(seconds: float) -> Callable[[asyncio.StreamWriter], Awaitable[None]]:
    async def pause(writer: asyncio.StreamWriter) -> None:
        await writer.drain()
        await asyncio.sleep(seconds)

    return pause


def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()


async def _answer_then_close_before_reuse(
    upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await upstream.read_request(reader)
    writer.write(OK)
    await writer.drain()
    await asyncio.sleep(0.05)  # read whole, then closed before the client's next request


# Bytes beyond a complete response in the same read: llhttp (aiohttp's parser) parses them as
# the next response and aiohttp then fails the whole read, the complete response with it; h11
# returns the response and fails the next request on that connection instead.
SAME_READ = (
    "aiohttp fails a complete response when unexpected bytes follow it in the same read; the "
    "reference loses the next request on that connection instead"
)

CASES = [
    Case("complete-then-close", answering(OK + b"")),
    Case(
        "extra-bytes-after-response",
        answering(OK + b"garbage\r\n"),
        requests=2,
        differs=SAME_READ,
        reference=(ok(b"ok"), error("protocol")),
        ours=(error("protocol"), error("protocol")),
    ),
    Case(
        "extra-bytes-in-a-later-packet",
        _then(_write(OK), _pause(0.1), _write(b"garbage\r\n")),
        requests=2,
    ),
    Case(
        "extra-crlf-after-response",
        answering(OK + b"\r\n"),
        requests=2,
        differs="an empty line after a response is skipped by aiohttp; the reference takes it "
        "for the next answer and fails the next request on that connection",
        reference=(ok(b"ok"), error("protocol")),
        ours=(ok(b"ok"), ok(b"ok")),
    ),
    Case(
        "two-responses-joined",
        answering(OK + b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond"),
        requests=2,
        differs="the reference hands the second request the answer that arrived before it was "
        "sent; ours opens a fresh connection for it",
        reference=(ok(b"ok"), ok(b"second")),
        ours=(ok(b"ok"), ok(b"ok")),
    ),
    Case(
        "head-answered-with-a-body",
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello"),
        method="HEAD",
        requests=2,
        differs=SAME_READ,
        reference=(ok(b""), error("protocol")),
        ours=(error("protocol"), ok(b"hello")),
    ),
    Case(
        "reset-mid-body-without-length",
        _then(_write(b"HTTP/1.1 200 OK\r\n\r\npartial"), _pause(0.05), reset),
    ),
    Case(
        "close-ends-a-body-without-length", _then(_write(b"HTTP/1.1 200 OK\r\n\r\nwhole"), _close)
    ),
    Case("read-whole-then-closed-before-reuse", _answer_then_close_before_reuse, requests=2),
    Case(
        "body-longer-than-content-length",
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello world"),
        requests=2,
        differs=SAME_READ,
        reference=(ok(b"hello"), error("protocol")),
        ours=(error("protocol"), error("protocol")),
    ),
    Case("nul-in-header-value", answering(b"HTTP/1.1 200 OK\r\nx-a: a\x00b\r\n" + OK[17:])),
    Case("nul-in-header-name", answering(b"HTTP/1.1 200 OK\r\nx\x00a: b\r\n" + OK[17:])),
    Case("space-in-header-name", answering(b"HTTP/1.1 200 OK\r\nx a: b\r\n" + OK[17:])),
    Case("bare-cr-in-header-value", answering(b"HTTP/1.1 200 OK\r\nx-a: a\rb\r\n" + OK[17:])),
    Case(
        "control-char-in-header-value", answering(b"HTTP/1.1 200 OK\r\nx-a: a\x01b\r\n" + OK[17:])
    ),
    Case(
        "chunk-extensions",
        answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\n\r\n"
        ),
        requests=2,
    ),
    Case(
        "chunked-trailers",
        answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-t: 1\r\n\r\n"
        ),
        requests=2,
    ),
    Case(
        "bad-chunk-size",
        answering(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ),
    Case(
        "overflowing-chunk-size",
        _then(
            _write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + b"f" * 20 + b"\r\n")
        ),
        differs="aiohttp refuses a chunk size that overflows at once; h11 waits for more bytes "
        "until its read timeout",
        reference=(error("timeout"),),
        ours=(error("protocol"),),
    ),
    Case(
        "content-length-and-transfer-encoding",
        answering(
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\ntransfer-encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        ),
        differs="both framings in one response is refused by aiohttp (RFC 9112 6.3: 'ought to "
        "be handled as an error', the shape of response smuggling); h11 follows the chunks",
        reference=(ok(b"hello"),),
        ours=(error("protocol"),),
    ),
    Case(
        "duplicate-equal-content-length",
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello"),
        differs="RFC 9110 8.6 allows either rejecting a repeated Content-Length or folding equal "
        "ones: aiohttp rejects, h11 folds",
        reference=(ok(b"hello"),),
        ours=(error("protocol"),),
    ),
    Case(
        "duplicate-different-content-length",
        answering(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!"),
    ),
    Case(
        "informational-answers-first",
        answering(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + OK
        ),
        requests=2,
    ),
    Case("slow-loris-head", _then(_write(b"HTTP/1.1 200 OK\r\nx-a: "))),
    Case("closed-without-an-answer", _then(_close)),
    Case("reset-without-an-answer", _then(reset)),
    Case("malformed-status-line", answering(b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\nok")),
]


async def _outcomes(case: Case, client: httpx.AsyncClient) -> tuple[tuple[Outcome, ...], int]:
    outcomes: list[Outcome] = []
    async with RawUpstream(case.script) as upstream, client:
        for index in range(case.requests):
            method = case.method if index == 0 else "POST"
            try:
                response = await client.request(
                    method,
                    upstream.url + f"/edit/{index}",
                    content=b"x" * 1000 if method == "POST" else None,
                    timeout=httpx.Timeout(READ_TIMEOUT),
                )
                outcomes.append(ok(response.content, response.status_code))
            except httpx.TransportError as exc:
                outcomes.append(error(family(exc)))
            await asyncio.sleep(0.2)
        return tuple(outcomes), len(upstream.heads)


def _ours() -> httpx.AsyncClient:
    pool = UpstreamPool(max_connections=8, keepalive_expiry=30, ssl_context=None)
    return _ClosingPool(pool, transport=AiohttpTransport(pool, max_response_bytes=2**20))


class _ClosingPool(httpx.AsyncClient):
    def __init__(self, pool: UpstreamPool, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._pool = pool

    async def aclose(self) -> None:
        await super().aclose()
        await self._pool.aclose()


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_the_transport_answers_a_hostile_upstream_as_the_reference_does(case: Case) -> None:
    async def both() -> tuple[tuple[Outcome, ...], tuple[Outcome, ...], int]:
        async with asyncio.timeout(60):
            reference, _ = await _outcomes(case, httpx.AsyncClient(trust_env=False))
            ours, requests_seen = await _outcomes(case, _ours())
            return reference, ours, requests_seen

    reference, ours, requests_seen = asyncio.run(both())
    if case.differs:
        assert (reference, ours) == (case.reference, case.ours), case.differs
    else:
        assert ours == reference
    # Whatever failed, it failed after the upstream had the request: never a retried kind.
    assert requests_seen == case.requests
    assert error("connect") not in ours
