"""Acceptance 3 (issue 10): JSON edits. Data URLs are decoded under the upload limits into the
same uploads multipart makes; https URLs are fetched only when enabled, through the SSRF guard,
which refuses loopback, private and metadata addresses before connecting, on every redirect."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from app.config.settings import ImageUrlConfig, Limits
from app.errors import InvalidRequest
from app.intake.json_body import JsonEditReader
from app.main import create_app
from app.upstream.fetch import ImageFetcher
from app.upstream.url_guard import UrlGuard
from tests.fakes.openai_upstream import RESULT_PNG, FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_env import gateway_settings
from tests.support.rerouting import Rerouting
from tests.support.servers import serve_in_thread

PNG = images.png(48, 48)
MASK = images.mask_png(48, 48)
AUTH = {"authorization": f"Bearer {CLIENT_KEY}"}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def post_json(url: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + "/v1/images/edits", json=body, headers=AUTH, timeout=30)


def test_json_edit_with_data_urls_reaches_the_upstream_as_files(
    gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    jpeg = images.jpeg(48, 48)
    response = post_json(
        gateway_url,
        {
            "prompt": "a hat",
            "model": "gpt-image-1.5",
            "images": [{"image_url": data_url(PNG)}, {"image_url": data_url(jpeg, "image/jpeg")}],
            "mask": {"image_url": data_url(MASK)},
            "n": 2,
            "quality": "low",
        },
    )
    assert response.status_code == 200, response.text
    assert [base64.b64decode(item["b64_json"]) for item in response.json()["data"]] == [
        RESULT_PNG
    ] * 2
    (sent,) = upstream.edits
    assert [(f.field, f.sha256) for f in sent.files] == [
        ("image[]", sha(PNG)),
        ("image[]", sha(jpeg)),
        ("mask", sha(MASK)),
    ]
    assert sent.field_map()["n"] == "2" and sent.field_map()["quality"] == "low"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"images": [{"file_id": "file-abc"}]}, 400, "images[0]", "unsupported_parameter"),
        ({"images": [{"image_url": "data:image/png;base64,@@@"}]}, 400, "images[0]", None),
        ({"images": [{"image_url": "ftp://x/y.png"}]}, 400, "images[0]", "invalid_image_url"),
        ({"images": "data:image/png;base64,AAAA"}, 400, "images", "invalid_type"),
        # Sniffed like an upload: bytes that are no image are refused by validation.
        ({"images": [{"image_url": data_url(b"not an image")}]}, 400, "image[0]", None),
        # https URLs are off by default.
        (
            {"images": [{"image_url": "https://images.example/a.png"}]},
            400,
            "images[0]",
            "image_url_disabled",
        ),
        ({"images": [{"image_url": data_url(PNG)}], "n": [1]}, 400, "n", "invalid_type"),
    ],
    ids=["file_id", "bad-base64", "ftp", "not-a-list", "not-an-image", "https-off", "n-list"],
)
def test_json_edit_rejections(
    gateway_url: str,
    upstream: FakeOpenAIUpstream,
    body: dict[str, Any],
    status: int,
    param: str,
    code: str | None,
) -> None:
    response = post_json(gateway_url, {"prompt": "x", **body})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert upstream.edits == []


def test_json_edit_data_url_over_the_size_limit_is_413(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    settings = gateway_settings(fake_upstream.url)
    limits = settings.limits.model_copy(update={"max_file_bytes": 500})
    with serve_in_thread(create_app(settings.model_copy(update={"limits": limits}))) as url:
        response = post_json(
            url, {"prompt": "x", "images": [{"image_url": data_url(images.png(256, 256))}]}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"
    assert upstream.edits == []


@pytest.fixture(scope="module")
def victim() -> Iterator[tuple[str, list[str]]]:
    """A server standing in for what must never be reached; records every request."""
    hits: list[str] = []

    async def anything(request: Request) -> Response:
        hits.append(request.url.path)
        return Response(PNG, media_type="image/png")

    app = Starlette(routes=[Route("/{path:path}", anything)])
    with serve_in_thread(app) as url:
        yield url, hits


@pytest.mark.parametrize(
    "target",
    [
        "https://{victim_host}/secret.png",
        "https://10.0.0.1/x.png",
        "https://169.254.169.254/latest/meta-data/iam",
        "https://[::1]/x.png",
        "https://localhost/x.png",
    ],
)
def test_json_edit_https_url_to_private_addresses_is_refused_unconnected(
    fake_upstream: FakeOpenAIUpstream,
    upstream: FakeOpenAIUpstream,
    victim: tuple[str, list[str]],
    target: str,
) -> None:
    victim_url, hits = victim
    settings = gateway_settings(
        fake_upstream.url,
        GATEWAY_IMAGE_URLS_ENABLED="true",
    )
    # The victim's port is allowed: its address is what must refuse it.
    ports = (443, httpx.URL(victim_url).port)
    image_urls = settings.image_urls.model_copy(update={"allowed_ports": ports})
    settings = settings.model_copy(update={"image_urls": image_urls})
    url = target.format(victim_host=victim_url.removeprefix("http://"))
    with serve_in_thread(create_app(settings)) as gateway:
        response = post_json(gateway, {"prompt": "x", "images": [{"image_url": url}]})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "images[0]" and error["code"] == "invalid_image_url"
    assert "non-public address" in error["message"]
    assert hits == []
    assert upstream.edits == []


@pytest.mark.parametrize(
    "target",
    ["https://{victim_host}/secret.png", "https://169.254.169.254/latest/meta-data/iam"],
)
def test_json_edit_url_redirecting_to_a_private_address_is_refused_unconnected(
    victim: tuple[str, list[str]], target: str
) -> None:
    victim_url, hits = victim
    location = target.format(victim_host=victim_url.removeprefix("http://"))

    async def redirect(request: Request) -> Response:
        return Response(status_code=302, headers={"location": location})

    async def public(request: Request) -> Response:
        return Response(PNG, media_type="image/png")

    redirector = Starlette(routes=[Route("/redirect.png", redirect), Route("/fine.png", public)])

    async def resolve(host: str, port: int) -> list[str]:
        return ["93.184.216.34"] if host == "images.example" else ["127.0.0.1"]

    async def run(transport: Rerouting, url: str) -> list[Any]:
        config = ImageUrlConfig(enabled=True, allowed_ports=(443, httpx.URL(victim_url).port))
        guard = UrlGuard.from_config(config, resolver=resolve)
        async with httpx.AsyncClient(transport=transport) as client:
            reader = JsonEditReader(
                Limits(),
                max_file_bytes=10**6,
                fetch_url=ImageFetcher(client, config, guard=guard, subject="The image"),
            )
            form = await reader.form({"prompt": "x", "images": [{"image_url": url}]})
            sizes = [upload.size for upload in form.files]
            form.close()
            return sizes

    with serve_in_thread(redirector) as public_url:
        # The same path works for a public image (the reroute is sound)...
        transport = Rerouting(public_url)
        assert asyncio.run(run(transport, "https://images.example/fine.png")) == [len(PNG)]
        # ...and the redirect's target is vetted before any connection is made to it.
        transport = Rerouting(public_url)
        with pytest.raises(InvalidRequest) as caught:
            asyncio.run(run(transport, "https://images.example/redirect.png"))
    assert "non-public address" in caught.value.message
    assert caught.value.param == "images[0]"
    assert transport.addresses == ["93.184.216.34"]
    assert hits == []


def test_json_edit_plain_http_url_is_the_guards_call(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    """Which schemes may be fetched is decided by the guard alone (image_urls.allow_http), so
    the intake and the guard cannot disagree; the default refuses http with a 400."""
    settings = gateway_settings(
        fake_upstream.url,
        GATEWAY_IMAGE_URLS_ENABLED="true",
    )
    with serve_in_thread(create_app(settings)) as gateway:
        response = post_json(
            gateway, {"prompt": "x", "images": [{"image_url": "http://images.example/a.png"}]}
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("images[0]", "invalid_image_url")
    assert "scheme 'http' is not allowed (use https)" in error["message"]
    assert upstream.edits == []
