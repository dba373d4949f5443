"""The download of image URLs the gateway did not choose: the SSRF guard on every hop, size and
time caps.

The guard's own rules (allowlist patterns, address classes) are tested in
tests/unit/upstream/test_url_guard.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from app.config.settings import FetchConfig
from app.upstream.fetch import FetchRefused, ImageFetcher
from app.upstream.url_guard import UrlGuard
from tests.support import images
from tests.support.counting_listener import CountingListener
from tests.support.rerouting import PUBLIC_ADDRESS, Rerouting
from tests.support.servers import serve_in_thread

PNG = images.png(8, 8)


@pytest.fixture(scope="module")
def files_url() -> Iterator[str]:
    async def serve(request: Any) -> Response:
        name = request.path_params["name"]
        if name == "elsewhere":
            return Response(status_code=302, headers={"location": "http://example.invalid/x.png"})
        if name == "loop":
            return Response(status_code=302, headers={"location": "/files/loop"})
        if name == "gone":
            return Response(status_code=404)
        if name == "to":  # a redirect to wherever the test says
            return Response(status_code=302, headers={"location": request.query_params["loc"]})
        return Response(PNG, media_type="image/png")

    with serve_in_thread(Starlette(routes=[Route("/files/{name}", serve)])) as url:
        yield url


def fetch(url: str, **config: Any) -> bytes:
    extra = config.pop("extra", ())
    config.setdefault("allow_http", True)  # the test servers speak plain http
    config.setdefault("allowed_ports", (httpx.URL(url).port or 443,))

    async def run() -> bytes:
        async with httpx.AsyncClient() as client:
            return await ImageFetcher(client, FetchConfig(**config), extra_hosts=extra)(url)

    return asyncio.run(run())


def refusal(url: str, **config: Any) -> str:
    with pytest.raises(FetchRefused) as caught:
        fetch(url, **config)
    assert caught.value.status_code == 502
    return caught.value.message


def test_fetch_refuses_hosts_outside_the_allowlist(files_url: str) -> None:
    assert "not in the allowed hosts" in refusal(
        files_url + "/files/a.png", allowed_hosts=("example.com",), allow_private_addresses=True
    )


def test_fetch_refuses_loopback_on_an_allowed_host_by_default(files_url: str) -> None:
    # `localhost` is allowlisted here, but it resolves to a loopback address.
    url = files_url.replace("127.0.0.1", "localhost") + "/files/a.png"
    assert "non-public address" in refusal(url, allowed_hosts=("localhost",))
    assert "non-public address" in refusal(files_url + "/files/a.png", extra=("127.0.0.1",))


def test_fetch_downloads_when_private_addresses_are_allowed(files_url: str) -> None:
    url = files_url + "/files/a.png"
    assert fetch(url, allow_private_addresses=True, extra=("127.0.0.1",)) == PNG


def test_fetch_rechecks_every_redirect_and_bounds_them(files_url: str) -> None:
    allowed: dict[str, Any] = {"allow_private_addresses": True, "extra": ("127.0.0.1",)}
    assert "not in the allowed hosts" in refusal(files_url + "/files/elsewhere", **allowed)
    assert "redirected too many times" in refusal(files_url + "/files/loop", **allowed)
    assert "HTTP 404" in refusal(files_url + "/files/gone", **allowed)


def test_fetch_refuses_odd_urls(files_url: str) -> None:
    allowed: dict[str, Any] = {"allow_private_addresses": True, "extra": ("127.0.0.1",)}
    assert "scheme 'file' is not allowed" in refusal("file:///etc/passwd", **allowed)
    assert "scheme 'http' is not allowed" in refusal(
        files_url + "/files/a.png", **allowed, allow_http=False
    )
    assert "credentials" in refusal(files_url.replace("//", "//u:p@") + "/files/a.png", **allowed)


def test_fetch_caps_the_size(files_url: str) -> None:
    message = refusal(
        files_url + "/files/a.png", allow_private_addresses=True, extra=("127.0.0.1",), max_bytes=16
    )
    assert "larger than 16 bytes" in message


@pytest.mark.parametrize(
    "location",
    [
        "https:\\\\127.0.0.1\\x",  # https:\\127.0.0.1\x: httpx raises InvalidURL building it
        "https:\\\\169.254.169.254\\latest",
    ],
)
def test_fetch_redirect_to_an_unparseable_location_is_a_clean_refusal(
    files_url: str, location: str
) -> None:
    url = files_url + "/files/to?" + str(httpx.QueryParams(loc=location))
    message = refusal(url, allow_private_addresses=True, extra=("127.0.0.1",))
    assert "redirected to a URL that cannot be parsed" in message
    assert "127.0.0.1\\x" not in message and "169.254" not in message


# Where redirects point, by a literal address or by what DNS answers for a name (the guard's
# resolver seam): all of them lead to this machine's loopback or the metadata address.
ANSWERS = {
    "images.example": [PUBLIC_ADDRESS],
    "mapped.example": ["::ffff:127.0.0.1"],
    "compatible.example": ["::127.0.0.1"],
    "nat64.example": ["64:ff9b::7f00:1"],
    "nat64-local.example": ["64:ff9b:1:7f00:1:0:100::"],
    "sixtofour.example": ["2002:7f00:1::1"],
    "teredo.example": ["2001:0:4136:e378:8000:63bf:80ff:fffe"],
    "metadata.example": [PUBLIC_ADDRESS, "64:ff9b::a9fe:a9fe"],
}


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://[::ffff:127.0.0.1]:{port}/x.png", "non-public address"),
        ("http://[::127.0.0.1]:{port}/x.png", "non-public address"),
        ("http://[::ffff:0:7f00:1]:{port}/x.png", "non-public address"),
        ("http://[64:ff9b::7f00:1]:{port}/x.png", "non-public address"),
        ("http://[64:ff9b::a9fe:a9fe]:{port}/x.png", "non-public address"),
        ("http://[2002:a9fe:a9fe::]:{port}/x.png", "non-public address"),
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:{port}/x.png", "non-public address"),
        *[(f"http://{name}:{{port}}/x.png", "non-public address") for name in list(ANSWERS)[1:]],
        ("http://images.example:22/x.png", "port 22 is not an allowed port"),
        ("http://images.example:99999/x.png", "port 99999 is not an allowed port"),
    ],
)
def test_fetch_redirect_to_a_refused_address_or_port_connects_nowhere(
    files_url: str, target: str, reason: str
) -> None:
    """The first hop is a public name (rerouted to the loopback file server); the redirect's
    target is refused before any connection: the transport saw one address, the listener none."""

    async def resolve(host: str, port: int) -> list[str]:
        return ANSWERS[host]

    async def run(listener: CountingListener) -> tuple[FetchRefused, list[str]]:
        config = FetchConfig(
            allowed_hosts=("*",), allowed_ports=(80, listener.port), allow_http=True
        )
        location = target.format(port=listener.port)
        transport = Rerouting(files_url)
        async with httpx.AsyncClient(transport=transport) as client:
            fetcher = ImageFetcher(
                client, config, guard=UrlGuard.from_config(config, resolver=resolve)
            )
            with pytest.raises(FetchRefused) as caught:
                await fetcher(
                    "http://images.example/files/to?" + str(httpx.QueryParams(loc=location))
                )
        return caught.value, transport.addresses

    with CountingListener("127.0.0.1") as listener:
        error, addresses = asyncio.run(run(listener))
        assert reason in error.message
        assert addresses == [PUBLIC_ADDRESS]
        assert listener.count == 0


def test_fetch_listener_counts_what_gets_through(files_url: str) -> None:
    """The control for the test above: the same redirect to an address the rules allow here
    (private addresses allowed) is connected to, and the listener counts it."""
    with CountingListener("127.0.0.1") as listener:
        location = f"http://127.0.0.1:{listener.port}/x.png"
        url = files_url + "/files/to?" + str(httpx.QueryParams(loc=location))
        ports = (httpx.URL(files_url).port, listener.port)
        message = refusal(
            url, allow_private_addresses=True, extra=("127.0.0.1",), allowed_ports=ports
        )
        assert "failed" in message
        assert listener.count == 1
