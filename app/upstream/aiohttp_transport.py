"""Upstream HTTP on aiohttp's client, under httpx's API.

httpx stays the API everywhere in app/ (Request, Response, Timeout, exceptions); aiohttp does the
wire: connections and keep-alive, HTTP/1.1 framing, TLS, proxy tunnels. This module translates,
and holds one rule of its own, the billing rule: a failure may become httpx.ConnectError or
ConnectTimeout (which app/routing/forwarder.py retries on another key) only when no byte of the
request can have been written, i.e. aiohttp's connector failed before it handed a connection over.
Anything later (a reset, a close, a timeout, a malformed answer) is a ReadError, WriteError,
ReadTimeout, WriteTimeout or RemoteProtocolError: the upstream may be running the request and
billing for it, so it is never sent again. That includes a kept-alive connection the upstream
closed just as it was reused (aiohttp's ServerDisconnectedError): the request may have gone out.
A short http.keepalive_expiry keeps that race rare. aiohttp itself retries on a fresh connection
only idempotent methods (GET, HEAD...), never a POST.

Two things aiohttp leaves to its caller are done here: the cap on requests in flight (an
asyncio.Semaphore: aiohttp's own limit loses the wake-up of a waiter cancelled as it is woken,
and the others then wait out their whole timeout), and telling a body that runs until the
connection closes from one cut off by a reset (aiohttp returns both as complete).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, AsyncIterator

import aiohttp
import httpx
from yarl import URL

from app.upstream.egress import Egress

# Body pieces smaller than this are joined into writes of about WRITE_BYTES: aiohttp sends each
# piece with its own send(), and on loopback a send costs more than copying 64 KB. Larger pieces
# (spooled uploads are read back 1 MB at a time) go as they are.
JOIN_BELOW_BYTES = 256 * 1024
WRITE_BYTES = 1024 * 1024
# A response header line longer than this is refused (aiohttp's default is 8 KiB; some upstreams
# send long CSP or cookie headers).
MAX_HEADER_BYTES = 64 * 1024
# Response bytes aiohttp buffers before it stops reading until the caller catches up.
READ_BUFFER_BYTES = 1024 * 1024
# Never written in a header: a CR or LF would let a config value or a client's field add headers
# or a second request.
_FORBIDDEN = frozenset(b"\r\n\0")


class UpstreamPool:
    """The process's upstream connections: one aiohttp session (connections per origin, TLS name
    and proxy; keep-alive) and the cap on requests in flight, shared by every AiohttpTransport."""

    def __init__(
        self,
        *,
        max_connections: int,
        keepalive_expiry: float,
        ssl_context: ssl.SSLContext | None,
    ) -> None:
        """Needs the running event loop."""
        connector = aiohttp.TCPConnector(
            limit=0,  # the cap is `slots`
            keepalive_timeout=keepalive_expiry,
            ssl=ssl_context if ssl_context is not None else True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            # No cookie jar: one upstream answer's Set-Cookie must not ride along on later
            # requests.
            cookie_jar=aiohttp.DummyCookieJar(),
            # httpx decodes Content-Encoding itself.
            auto_decompress=False,
            # Proxies come from Egress (app/upstream/egress.py), not from aiohttp reading the
            # environment (and ~/.netrc) on each request.
            trust_env=False,
            # httpx writes these headers itself; aiohttp must not add its own.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
            read_bufsize=READ_BUFFER_BYTES,
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
        )
        # One per request from before it connects until its response is closed: with HTTP/1.1
        # that is one connection each.
        self.slots = asyncio.Semaphore(max_connections)

    async def aclose(self) -> None:
        await self.session.close()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One egress route (direct, or through a proxy) over the shared pool. Closing it leaves the
    pool open: whoever opened the pool closes it."""

    def __init__(
        self,
        pool: UpstreamPool,
        *,
        egress: Egress | None = None,
        max_response_bytes: int,
    ) -> None:
        self._pool = pool
        self._egress = egress or Egress.direct()
        self._max_response_bytes = max_response_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol {url.scheme!r}."
            )
        where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        headers = _headers(request)
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        slots = self._pool.slots
        if slots.locked():
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("No upstream connection became free in time.") from None
        else:
            await slots.acquire()
        try:
            response = await self._send(request, headers, timeouts, where)
        except BaseException:
            slots.release()
            raise
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_ResponseBody(response, request.method, where, self._max_response_bytes, slots),
            extensions={
                "http_version": b"HTTP/1.0" if response.version == (1, 0) else b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def _send(
        self,
        request: httpx.Request,
        headers: list[tuple[str, str]],
        timeouts: dict[str, float | None],
        where: str,
    ) -> aiohttp.ClientResponse:
        connect = timeouts.get("connect")
        timeout = aiohttp.ClientTimeout(
            total=None, connect=connect, sock_connect=connect, sock_read=timeouts.get("read")
        )
        proxy = self._egress.proxy_for(request)
        proxy_headers = None
        if proxy is not None and (authorization := proxy.authorization()) is not None:
            proxy_headers = {"Proxy-Authorization": authorization}
        upload = _Upload(timeouts.get("write"))
        try:
            async with asyncio.timeout(None) as upload.deadline:
                try:
                    return await self._pool.session.request(
                        request.method,
                        URL(str(request.url), encoded=True),
                        headers=headers,
                        data=upload.body(request, headers),
                        allow_redirects=False,
                        timeout=timeout,
                        # A pinned URL (app/upstream/url_guard.py) connects to a vetted address
                        # and verifies the certificate against the name it was checked for.
                        server_hostname=request.extensions.get("sni_hostname"),
                        proxy=proxy.url if proxy is not None else None,
                        proxy_headers=proxy_headers,
                    )
                finally:
                    upload.done()
        except TimeoutError as exc:
            if upload.deadline is not None and upload.deadline.expired():
                raise httpx.WriteTimeout(f"Timed out sending the request to {where}.") from None
            raise _translated(exc, where) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise _translated(exc, where) from None

    async def aclose(self) -> None:
        pass  # the pool is shared: closed by whoever opened it


def _headers(request: httpx.Request) -> list[tuple[str, str]]:
    headers = []
    for name, value in request.headers.raw:
        if not (_FORBIDDEN.isdisjoint(name) and _FORBIDDEN.isdisjoint(value)):
            raise httpx.LocalProtocolError("A request header contains a line break or a NUL.")
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    return headers


class _Upload:
    """The request body as aiohttp takes it, under httpx's write timeout: the longest aiohttp
    may take to ask for the next piece (it asks once the last one is in the socket's buffer)."""

    def __init__(self, write_seconds: float | None) -> None:
        self._write_seconds = write_seconds
        self.deadline: asyncio.Timeout | None = None
        self._writing = True

    def body(
        self, request: httpx.Request, headers: list[tuple[str, str]]
    ) -> bytes | AsyncIterator[bytes] | None:
        stream = request.stream
        if isinstance(stream, httpx.ByteStream):
            # httpx holds the whole body (JSON, a probe): a small one goes out with the head.
            content = request.content
            if len(content) < JOIN_BELOW_BYTES:
                return content or None
            return self._pieces(_one(content))
        if not any(name.lower() == "content-length" for name, _ in headers):
            # httpx announced chunked encoding for a body without a length; aiohttp writes that
            # header itself and refuses a second one.
            headers[:] = [(n, v) for n, v in headers if n.lower() != "transfer-encoding"]
        assert isinstance(stream, httpx.AsyncByteStream)
        return self._pieces(stream)

    async def _pieces(self, stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        first = True
        self._watch()
        async for piece in _writes(stream):
            if first and len(piece) >= JOIN_BELOW_BYTES:
                # aiohttp joins its first piece to the request head; an empty one sends the head
                # alone instead of copying a large piece behind it.
                yield b""
            first = False
            yield piece
            self._watch()
        self.done()

    def _watch(self) -> None:
        deadline, seconds = self.deadline, self._write_seconds
        if seconds is None or deadline is None or not self._writing or deadline.expired():
            return
        deadline.reschedule(asyncio.get_running_loop().time() + seconds)

    def done(self) -> None:
        """The body is written, or the request is over: reading has aiohttp's timeout."""
        deadline = self.deadline
        if self._writing and deadline is not None and not deadline.expired():
            deadline.reschedule(None)
        self._writing = False


async def _one(content: bytes) -> AsyncIterator[bytes]:
    yield content


async def _writes(stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    """The pieces, small ones joined into writes of about WRITE_BYTES."""
    pending: list[bytes] = []
    pending_bytes = 0
    async for piece in stream:
        if len(piece) >= JOIN_BELOW_BYTES:
            if pending:
                yield b"".join(pending)
                pending, pending_bytes = [], 0
            yield piece
            continue
        pending.append(piece)
        pending_bytes += len(piece)
        if pending_bytes >= WRITE_BYTES:
            yield b"".join(pending)
            pending, pending_bytes = [], 0
    if pending:
        yield b"".join(pending)


class _ResponseBody(httpx.AsyncByteStream):
    def __init__(
        self,
        response: aiohttp.ClientResponse,
        method: str,
        where: str,
        max_bytes: int,
        slots: asyncio.Semaphore,
    ) -> None:
        self._response = response
        self._where = where
        self._max_bytes = max_bytes
        self._slots: asyncio.Semaphore | None = slots
        # A body with neither a length nor chunks ends when the connection does: only a clean
        # close (not a reset) ends it complete. aiohttp reports both as the body's end; the
        # connection's `closed` future tells them apart (set before the body's end is fed).
        self._closed: asyncio.Future[None] | None = None
        connection = response.connection
        if (
            connection is not None
            and connection.protocol is not None
            and method != "HEAD"
            and response.status not in (204, 304)
            and response.content_length is None
            and "transfer-encoding" not in response.headers
        ):
            self._closed = connection.protocol.closed
            if self._closed is not None:
                self._closed.add_done_callback(_retrieve)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        response = self._response
        received = 0
        try:
            declared = response.content_length
            if declared is not None and declared > self._max_bytes:
                raise _over_cap(self._max_bytes)
            async for chunk in response.content.iter_any():
                received += len(chunk)
                if received > self._max_bytes:
                    raise _over_cap(self._max_bytes)
                yield chunk
            closed = self._closed
            if closed is not None and closed.done() and closed.exception() is not None:
                raise httpx.ReadError(f"{self._where} reset the connection before its body ended.")
        except httpx.TransportError:
            response.close()
            raise
        except (aiohttp.ClientError, OSError) as exc:
            response.close()
            raise _translated(exc, self._where, reading=True) from None

    async def aclose(self) -> None:
        # Read to its end, the connection goes back to aiohttp's pool; else it is closed.
        self._response.release()
        slots, self._slots = self._slots, None
        if slots is not None:
            slots.release()


def _retrieve(future: asyncio.Future[None]) -> None:
    # Read once so that asyncio does not log a reset nobody asked about.
    if not future.cancelled():
        future.exception()


def _over_cap(limit: int) -> httpx.RemoteProtocolError:
    return httpx.RemoteProtocolError(f"The upstream's response is larger than {limit} bytes.")


def _translated(exc: BaseException, where: str, *, reading: bool = False) -> httpx.TransportError:
    """aiohttp's error as httpx's, by the billing rule. Messages name the host and what failed,
    never aiohttp's own text (it can quote URLs and proxy settings)."""
    # Raised by aiohttp's connector before it hands a connection over: nothing was sent.
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(f"Timed out connecting to {where}.")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return httpx.ProxyError(f"The proxy refused the tunnel to {where} (HTTP {exc.status}).")
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return httpx.ConnectError(f"Could not connect to the proxy for {where}.")
    if isinstance(exc, aiohttp.ClientSSLError):
        return httpx.ConnectError(f"TLS with {where} failed: {_tls_reason(exc)}")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return httpx.ConnectError(f"Could not connect to {where}: {exc.strerror or 'failed'}")
    # Anything else may follow a written request.
    if isinstance(exc, TimeoutError):
        return httpx.ReadTimeout(f"Timed out reading the answer of {where}.")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(
            f"{where} closed the connection before its response ended."
            if reading
            else f"{where} closed the connection without a response."
        )
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(f"{where} sent a malformed or incomplete response.")
    if isinstance(exc, aiohttp.ClientConnectionResetError):
        return httpx.WriteError(f"{where} closed the connection while the request was sent.")
    if isinstance(exc, ValueError):
        return httpx.LocalProtocolError(f"The request to {where} could not be written.")
    return httpx.ReadError(f"The connection to {where} failed.")


def _tls_reason(exc: aiohttp.ClientSSLError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "the certificate was not accepted."
    reason = getattr(exc.os_error, "reason", None)
    return f"{reason}." if isinstance(reason, str) else "the handshake failed."
