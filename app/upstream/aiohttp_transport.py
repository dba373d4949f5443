"""Upstream HTTP on aiohttp's client, under httpx's API.

httpx stays the API everywhere in app/ (Request, Response, Timeout, exceptions); aiohttp does the
wire: the connection pool, HTTP/1.1 framing, TLS, proxy tunnels. This module only translates, and
holds one rule of its own, the billing rule: a failure may become httpx.ConnectError or
ConnectTimeout (which app/forwarding.py retries on another key) only when no byte of the request
can have been written: aiohttp's connector errors, raised before a connection is handed over.
Anything after that (a reset, a close, a timeout, a malformed answer) is a ReadError, WriteError,
ReadTimeout, WriteTimeout or RemoteProtocolError: the upstream may be running the request and
billing for it, so it is never sent again. That includes a kept-alive connection the upstream
closed just as it was reused (aiohttp's ServerDisconnectedError): a request may have gone out on
it. Short keep-alive (http.keepalive_expiry) keeps that race rare. aiohttp retries on a fresh
connection by itself only for idempotent methods (GET, HEAD...), never a POST.

Why aiohttp and not httpx's own transport: measured on a 1 MB upload to a loopback upstream,
httpcore costs about 1 ms more CPU per request (see README, Performance).
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
# piece it is given with its own send(), and on loopback a send costs more than copying 64 KB.
# Larger pieces (spooled uploads read back 1 MB at a time) go as they are.
JOIN_BELOW_BYTES = 256 * 1024
WRITE_BYTES = 1024 * 1024
# A response head line longer than this is refused (aiohttp's default is 8 KiB: some upstreams
# send long CSP or cookie headers).
MAX_HEADER_BYTES = 64 * 1024
# Response bytes aiohttp buffers before it stops reading the socket until the caller catches up.
READ_BUFFER_BYTES = 1024 * 1024
_FORBIDDEN = frozenset(b"\r\n\0")


def open_session(
    *,
    max_connections: int,
    keepalive_expiry: float,
    ssl_context: ssl.SSLContext | None,
) -> aiohttp.ClientSession:
    """The process's one pool of upstream connections; needs a running event loop."""
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        keepalive_timeout=keepalive_expiry,
        ssl=ssl_context if ssl_context is not None else True,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # No cookie jar: one upstream answer's Set-Cookie must not ride along on later requests.
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


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One egress route (direct, or through a proxy) over a shared session. Closing it leaves the
    session open: whoever opened the session closes it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        egress: Egress | None = None,
        max_response_bytes: int,
    ) -> None:
        self._session = session
        self._egress = egress or Egress.direct()
        self._max_response_bytes = max_response_bytes

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(
                f"Request URL has an unsupported protocol {url.scheme!r}."
            )
        where = f"{url.host}:{url.port or (443 if url.scheme == 'https' else 80)}"
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        pool, connect = timeouts.get("pool"), timeouts.get("connect")
        timeout = aiohttp.ClientTimeout(
            total=None,
            # aiohttp's `connect` covers waiting for the pool and connecting, `sock_connect` one
            # connection attempt.
            connect=None if pool is None or connect is None else pool + connect,
            sock_connect=connect,
            sock_read=timeouts.get("read"),
        )
        headers = _headers(request)
        proxy = self._egress.proxy_for(request)
        proxy_headers = None
        if proxy is not None and (authorization := proxy.authorization()) is not None:
            proxy_headers = {"Proxy-Authorization": authorization}
        upload = _Upload(timeouts.get("write"))
        try:
            async with asyncio.timeout(None) as upload.deadline:
                try:
                    response = await self._session.request(
                        request.method,
                        URL(str(url), encoded=True),
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
        return httpx.Response(
            response.status,
            headers=list(response.raw_headers),
            stream=_ResponseBody(response, where, self._max_response_bytes),
            extensions={
                "http_version": b"HTTP/1.0" if response.version == (1, 0) else b"HTTP/1.1",
                "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
            },
        )

    async def aclose(self) -> None:
        pass  # the session is shared: closed by whoever opened it


def _headers(request: httpx.Request) -> list[tuple[str, str]]:
    headers = []
    for name, value in request.headers.raw:
        # Header values come from config and clients' fields: a CR or LF would let one of them
        # add headers or a second request (h11 refuses them the same way).
        if _FORBIDDEN.isdisjoint(name) and _FORBIDDEN.isdisjoint(value):
            headers.append((name.decode("latin-1"), value.decode("latin-1")))
        else:
            raise httpx.LocalProtocolError("A request header contains a line break or a NUL.")
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
            # httpx holds the whole body (JSON, a probe): small ones go out with the head.
            content = request.content
            if len(content) < JOIN_BELOW_BYTES:
                return content or None
            return self._pieces(_one(content))
        if not any(name.lower() == "content-length" for name, _ in headers):
            # httpx announced chunked encoding for a body without a length; aiohttp writes the
            # header itself and refuses a second one.
            headers[:] = [(n, v) for n, v in headers if n.lower() != "transfer-encoding"]
        assert isinstance(stream, httpx.AsyncByteStream)
        return self._pieces(stream)

    async def _pieces(self, stream: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        first = True
        self._watch()
        async for piece in _writes(stream):
            if first and len(piece) >= JOIN_BELOW_BYTES:
                # aiohttp joins the first piece to the request head; an empty one sends the head
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
    def __init__(self, response: aiohttp.ClientResponse, where: str, max_bytes: int) -> None:
        self._response = response
        self._where = where
        self._max_bytes = max_bytes

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
        except httpx.RemoteProtocolError:
            response.close()
            raise
        except (aiohttp.ClientError, OSError) as exc:
            response.close()
            raise _translated(exc, self._where, reading=True) from None

    async def aclose(self) -> None:
        # Read to its end, the connection goes back to the pool; else it is closed.
        self._response.release()


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
