"""The download of upstream result URLs: the SSRF guard on every hop, size and time caps.

The guard's own rules (allowlist patterns, address classes) are tested in tests/test_url_guard.py.
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

from app.config import FetchConfig
from app.upstream.fetch import FetchRefused, ImageFetcher
from tests.support import images
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
