"""The HTTP/1.1 transport to upstreams, under httpx's client API.

Callers keep httpx: its Request, Response, Timeout and exception classes, so the upstream dialects
and their error handling do not know which transport runs underneath. What changes is the part
httpx delegates to httpcore. On this kind of machine httpcore + h11 + anyio cost about 0.7 ms of
CPU per upstream call whatever the body size (cancel scopes, event objects, a join of every body
chunk), twice what the gateway spends parsing a 1 MB upload, and httpcore's pool rescans every
connection on each request start and end (quadratic with a hundred calls in flight). Here each
connection is an asyncio Protocol: requests are written straight to the loop's transport with its
own flow control, responses are parsed by httptools (llhttp, the parser uvicorn already serves
with), and idle connections wait per origin, the most recently used reused first. HTTP/1.1 only:
the gateway's upstreams (OpenAI, resellers, Black Forest Labs) all speak it.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import httptools
import httpx

# A response head larger than this is refused: a broken or hostile upstream cannot make the
# gateway buffer headers without end.
MAX_HEAD_BYTES = 64 * 1024
# A response body larger than this is cut off with an error: a broken upstream streaming without
# end must not take the gateway's memory (callers read answers whole). Ten 4K images as base64
# JSON are far below it.
MAX_RESPONSE_BYTES = 1024 * 1024 * 1024
# Request bodies are written in batches of about this many bytes.
WRITE_BYTES = 1024 * 1024
# Reading from the socket pauses while this much response body waits for the caller.
READ_BUFFER_BYTES = 1024 * 1024

# scheme, host, port, and the name a TLS certificate is verified for (a pinned URL connects to an
# address but verifies a name: connections verified for one name never serve another).
Origin = tuple[str, str, int, str]


class Http1Transport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int,
        max_keepalive_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None = None,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._max_response_bytes = max_response_bytes
        self._max_connections = max_connections
        self._max_keepalive = max_keepalive_connections
        self._keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False

    @property
    def connections(self) -> tuple[int, int]:
        """(open, idle) connections."""
        return self._open, self._idle_total()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.LocalProtocolError("The transport is closed.")
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"Request URL has an unsupported protocol {scheme!r}.")
        port = url.port or (443 if scheme == "https" else 80)
        server_name = str(request.extensions.get("sni_hostname") or url.host)
        origin: Origin = (scheme, url.host, port, server_name if scheme == "https" else "")
        head = _request_head(request)
        connection = await self._acquire(origin, timeouts.get("pool"), timeouts.get("connect"))
        try:
            await connection.send(head, request, timeouts.get("write"))
            status, headers = await connection.receive_head(timeouts.get("read"))
            if request.method == "HEAD":
                connection.ends_without_body()
        except BaseException:
            connection.close()
            raise
        reason = connection.reason
        return httpx.Response(
            status,
            headers=headers,
            stream=_ResponseBody(self, connection, timeouts.get("read")),
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": reason},
        )

    async def aclose(self) -> None:
        self._closed = True
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.close()
        self._idle.clear()

    # The pool.

    async def _acquire(
        self,
        origin: Origin,
        pool_timeout: float | None,
        connect_timeout: float | None,
    ) -> _Connection:
        deadline = None if pool_timeout is None else time.monotonic() + pool_timeout
        while True:
            connection = self._take_idle(origin)
            if connection is not None:
                return connection
            if self._open < self._max_connections or self._close_any_idle():
                self._open += 1
                try:
                    return await self._connect(origin, connect_timeout)
                except BaseException:
                    self._open -= 1
                    self._wake_one()
                    raise
            await self._wait_for_room(deadline)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            expired = time.monotonic() - connection.idle_since > self._keepalive_expiry
            if connection.usable and not expired:
                return connection
            connection.close()
        return None

    def _close_any_idle(self) -> bool:
        # At the limit, an idle connection to another origin makes room for this one.
        for idle in self._idle.values():
            if idle:
                idle.pop(0).close()
                return self._open < self._max_connections
        return False

    async def _wait_for_room(self, deadline: float | None) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            raise httpx.PoolTimeout("No upstream connection became free in time.") from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: Origin, connect_seconds: float | None) -> _Connection:
        scheme, host, port, server_name = origin
        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            # A pinned URL (app/upstream/url_guard.py) connects to a vetted address and verifies
            # the certificate against the name it was checked for.
            tls = {"ssl": self._ssl_context, "server_hostname": server_name}
        try:
            async with asyncio.timeout(connect_seconds):
                _, connection = await loop.create_connection(
                    lambda: _Connection(self._forget, self._max_response_bytes), host, port, **tls
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"Timed out connecting to {host}:{port}.") from None
        except ssl.SSLError as exc:
            raise httpx.ConnectError(f"TLS with {host}:{port} failed: {exc.reason}") from None
        except OSError as exc:
            raise httpx.ConnectError(
                f"Could not connect to {host}:{port}: {exc.strerror or type(exc).__name__}"
            ) from None
        connection.origin = origin
        connection.counted = True
        return connection

    def _release(self, connection: _Connection) -> None:
        """A response read to its end: its connection waits for the next request, or closes."""
        if self._closed or not connection.reusable or self._idle_total() >= self._max_keepalive:
            connection.close()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._wake_one()

    def _forget(self, connection: _Connection) -> None:
        """Called once per connection when it closes, whoever closed it."""
        if not connection.counted:
            return  # it never left _connect, which gives its slot back itself
        self._open -= 1
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)
        self._wake_one()

    def _idle_total(self) -> int:
        # A few origins at most: counting beats keeping a count in step.
        return sum(len(idle) for idle in self._idle.values())


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: a request at a time, written as it comes, its response parsed
    as it arrives."""

    def __init__(self, on_closed: Any, max_response_bytes: int) -> None:
        self._max_response_bytes = max_response_bytes
        self._response_bytes = 0
        self.origin: Origin = ("", "", 0, "")
        self.counted = False  # handed to the pool, which counts it among the open ones
        self.idle_since = 0.0
        self.reason = b""
        self._on_closed = on_closed
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._closed = False
        self._active = False  # between a request's first byte and its response's last
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._head_bytes = 0
        self._informational = False
        self._head: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._until_close = False  # a body with neither length nor chunks ends when the peer closes
        self._keep_alive = False
        self._body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self._complete = False
        self._error: httpx.TransportError | None = None
        self._wakeup: asyncio.Future[None] | None = None

    @property
    def usable(self) -> bool:
        return not self._closed and self._transport is not None and not self._transport.is_closing()

    @property
    def reusable(self) -> bool:
        return self.usable and self._complete and self._keep_alive and self._error is None

    # Writing a request.

    async def send(self, head: bytes, request: httpx.Request, write_timeout: float | None) -> None:
        assert self._transport is not None
        # A kept-alive connection starts each request afresh.
        self._head = asyncio.get_running_loop().create_future()
        self._active = True
        self._complete = False
        self._keep_alive = False
        self._until_close = False
        self._head_bytes = 0
        self._headers = []
        self.reason = b""
        self._body.clear()  # a response its caller closed unread
        self._buffered = 0
        self._response_bytes = 0
        if self._reading_paused:
            self._reading_paused = False
            self._transport.resume_reading()
        declared = request.headers.get("content-length")
        chunked = declared is None and "chunked" in request.headers.get("transfer-encoding", "")
        # Pieces are gathered into vectored writes of about WRITE_BYTES (the head with the
        # first of them): a syscall per piece costs more than the bytes, and joining them
        # would copy every uploaded byte once more.
        pending: list[bytes] = [head]
        pending_bytes = len(head)
        sent = 0
        stream = request.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        async for chunk in stream:
            if self._head.done():
                # The upstream answered before the whole body was sent (a 413, a 401): stop
                # sending; the connection cannot carry another request after this one.
                self._keep_alive = False
                return
            if self._closed:
                raise self._error or httpx.WriteError("The upstream closed the connection.")
            if not chunk:
                continue
            sent += len(chunk)
            if chunked:
                pending += [b"%x\r\n" % len(chunk), chunk, b"\r\n"]
            else:
                pending.append(chunk)
            pending_bytes += len(chunk)
            if pending_bytes >= WRITE_BYTES:
                self._transport.writelines(pending)
                pending, pending_bytes = [], 0
                if not self._can_write.is_set():
                    await self._writable(write_timeout)
        if chunked:
            pending.append(b"0\r\n\r\n")
        elif declared is not None and sent != int(declared):
            raise httpx.LocalProtocolError(
                f"The request body was {sent} bytes, not the {declared} its Content-Length says."
            )
        if pending:
            self._transport.writelines(pending)

    async def _writable(self, write_seconds: float | None) -> None:
        try:
            async with asyncio.timeout(write_seconds):
                await self._can_write.wait()
        except TimeoutError:
            raise httpx.WriteTimeout("Timed out sending the request to the upstream.") from None
        if self._closed and not (self._head is not None and self._head.done()):
            raise self._error or httpx.WriteError("The upstream closed the connection.")

    # Reading its response.

    async def receive_head(
        self, read_seconds: float | None
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        assert self._head is not None
        try:
            async with asyncio.timeout(read_seconds):
                return await self._head
        except TimeoutError:
            raise httpx.ReadTimeout("Timed out waiting for the upstream's response.") from None

    def ends_without_body(self) -> None:
        # The answer to a HEAD has no body whatever its Content-Length says; llhttp cannot be
        # told, so the connection is not reused.
        self._complete = True
        self._keep_alive = False
        self._active = False

    async def next_body(self, read_seconds: float | None) -> bytes:
        """The body received so far and not yet taken (b"" once the body is complete)."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._wakeup = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(read_seconds):
                    await self._wakeup
            except TimeoutError:
                raise httpx.ReadTimeout("Timed out reading the upstream's response.") from None
            finally:
                self._wakeup = None
        chunk = self._body.popleft() if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return chunk

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.close()
        self._mark_closed(httpx.ReadError("The connection was closed."))

    # asyncio.Protocol.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have its methods.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if not self._active:
            # Bytes nobody asked for on an idle connection: it cannot be trusted for a request.
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(httpx.RemoteProtocolError(f"The upstream sent malformed HTTP: {exc}"))
            self.close()
            return
        if self._head is not None and not self._head.done():
            self._head_bytes += len(data)  # all of it was head: the head is not complete yet
        if self._head_bytes > MAX_HEAD_BYTES:
            self._fail(httpx.RemoteProtocolError("The upstream's response head is too large."))
            self.close()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._until_close and not self._complete and self._error is None:
            self._complete = True  # the body's end is the connection's end
            self._keep_alive = False
        self._mark_closed(
            httpx.RemoteProtocolError(
                "The upstream closed the connection before its response ended."
            )
            if self._head is not None and self._head.done()
            else httpx.RemoteProtocolError("The upstream closed the connection without a response.")
        )
        self._wake()

    def _mark_closed(self, error: httpx.TransportError) -> None:
        if self._closed:
            return
        self._closed = True
        self._can_write.set()
        if self._active and not self._complete:
            self._fail(error)
        self._on_closed(self)

    def _fail(self, error: httpx.TransportError) -> None:
        if self._error is None:
            self._error = error
        self._keep_alive = False
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: a caller that has gone away is no error
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    # httptools callbacks.

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_bytes += len(name) + len(value) + 4

    def on_status(self, status: bytes) -> None:
        self.reason = status

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:
            # 100 Continue and friends precede the real response; llhttp ends them as messages.
            self._informational = True
            self._headers = []
            return
        if self._head_bytes > MAX_HEAD_BYTES:
            return  # refused in data_received, once the parser hands control back
        self._keep_alive = self._parser.should_keep_alive()
        names = {name.lower() for name, _ in self._headers}
        self._until_close = (
            b"content-length" not in names
            and b"transfer-encoding" not in names
            and status not in (204, 304)
        )
        headers, self._headers = self._headers, []
        if self._head is not None and not self._head.done():
            self._head.set_result((status, headers))

    def on_body(self, body: bytes) -> None:
        self._response_bytes += len(body)
        if self._response_bytes > self._max_response_bytes:
            if self._error is None:
                self._fail(
                    httpx.RemoteProtocolError(
                        f"The upstream's response is larger than {self._max_response_bytes} bytes."
                    )
                )
                self.close()
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_BUFFER_BYTES and not self._reading_paused:
            assert self._transport is not None
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._informational:
            self._informational = False
            return
        self._complete = True
        self._active = False
        self._wake()


class _ResponseBody(httpx.AsyncByteStream):
    def __init__(
        self, pool: Http1Transport, connection: _Connection, read_seconds: float | None
    ) -> None:
        self._pool = pool
        self._connection: _Connection | None = connection
        self._read_seconds = read_seconds

    async def __aiter__(self) -> AsyncIterator[bytes]:
        connection = self._connection
        if connection is None:
            raise httpx.StreamClosed()
        while True:
            chunk = await connection.next_body(self._read_seconds)
            if not chunk:
                return
            yield chunk

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if connection.reusable:
            self._pool._release(connection)
        else:
            connection.close()


def _request_head(request: httpx.Request) -> bytes:
    target = request.url.raw_path or b"/"
    lines = [request.method.encode("ascii"), b" ", target, b" HTTP/1.1\r\n"]
    for name, value in request.headers.raw:
        # Header names and values come from config and clients' fields: a CR or LF would let
        # one of them add headers or a second request.
        if b"\r" in value or b"\n" in value or b"\r" in name or b"\n" in name or b":" in name:
            raise httpx.LocalProtocolError("A request header contains a line break.")
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)
