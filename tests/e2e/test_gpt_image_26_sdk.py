"""Acceptance (issue 16): GPT Image 2.6's GIF and SVG output and markup edits through the real
OpenAI SDK, the catalog's per-model rules (each refusal a 400 naming its `param`, with nothing
sent upstream), and a Redis-backed cache that answers the repeat with the right content type."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from app.main import create_app
from tests.fakes.openai_upstream import (
    RESULT_GIF,
    RESULT_PNG,
    RESULT_SVG,
    FakeOpenAIUpstream,
    Reply,
    images_response,
)
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_env import gateway_settings
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

MODEL = "gpt-image-2.6-flare"
PNG = images.png(64, 64)
MARKUP = images.markup_png(64, 64)
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'"


def png_file(data: bytes = PNG, name: str = "a.png") -> tuple[str, bytes, str]:
    return (name, data, "image/png")


@pytest.fixture
def cached_gateway(upstream: FakeOpenAIUpstream, redis_url: str) -> Iterator[str]:
    settings = gateway_settings(
        upstream.url, GATEWAY_CACHE_ENABLED="true", GATEWAY_REDIS_URL=redis_url
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url


def unique_prompt() -> str:
    # One Redis serves every test: a fresh prompt keeps each test's entries its own.
    return "issue 16 " + uuid.uuid4().hex


def edit_twice(
    gateway_url: str, upstream: FakeOpenAIUpstream, **kwargs: Any
) -> tuple[bytes, httpx.Response]:
    """The edit as b64_json (a miss, paid upstream), then again as a hosted URL (a hit); returns
    the decoded b64 image and the hosted file's response."""
    client = sdk_client(gateway_url)
    first = client.images.with_raw_response.edit(**kwargs)
    assert first.headers["x-cache"] == "miss"
    b64 = first.parse().data
    assert b64 is not None and b64[0].b64_json is not None
    again = client.images.with_raw_response.edit(**kwargs, response_format="url")
    assert again.headers["x-cache"] == "hit"
    hosted = again.parse().data
    assert hosted is not None and hosted[0].url is not None
    assert len(upstream.edits) == 1  # the repeat cost nothing
    return base64.b64decode(b64[0].b64_json), httpx.get(hosted[0].url, timeout=10)


def test_gif_edit_with_frame_count_reaches_upstream_and_comes_back_as_gif(
    cached_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    image, hosted = edit_twice(
        cached_gateway,
        upstream,
        image=png_file(),
        prompt=prompt,
        model=MODEL,
        output_format="gif",
        frame_count=4,
        frame_duration_ms=120,
    )
    sent = upstream.edits[0]
    # Only the fields the client sent: the model's defaults (9 frames, 200 ms) are OpenAI's.
    assert sorted(sent.fields) == [
        ("frame_count", "4"),
        ("frame_duration_ms", "120"),
        ("model", MODEL),
        ("output_format", "gif"),
        ("prompt", prompt),
    ]
    assert [(f.field, f.content_type, f.data) for f in sent.files] == [("image", "image/png", PNG)]
    assert image == RESULT_GIF
    assert hosted.status_code == 200
    assert hosted.headers["content-type"] == "image/gif"
    assert hosted.url.path.endswith(".gif")
    assert hosted.content == RESULT_GIF


def test_svg_edit_comes_back_as_svg_served_so_no_script_runs(
    cached_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    image, hosted = edit_twice(
        cached_gateway,
        upstream,
        image=png_file(),
        prompt=prompt,
        model=MODEL,
        output_format="svg",
        extra_body={"complexity": "low"},
    )
    assert upstream.edits[0].field_map() == {
        "model": MODEL,
        "prompt": prompt,
        "output_format": "svg",
        "complexity": "low",
    }
    assert image == RESULT_SVG
    assert hosted.status_code == 200
    assert hosted.headers["content-type"] == "image/svg+xml"
    assert hosted.url.path.endswith(".svg")
    assert hosted.headers["content-security-policy"] == SVG_CSP
    assert hosted.headers["x-content-type-options"] == "nosniff"
    assert hosted.content == RESULT_SVG


def test_markup_edit_forwards_the_markup_file_part(
    cached_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    image, hosted = edit_twice(
        cached_gateway,
        upstream,
        image=[png_file(), png_file(images.jpeg(), "b.jpg")],
        markup=png_file(MARKUP, "arrows.png"),
        prompt=prompt,
        model=MODEL,
    )
    sent = upstream.edits[0]
    assert [(f.field, f.content_type, f.data) for f in sent.files] == [
        ("image[]", "image/png", PNG),
        ("image[]", "image/jpeg", images.jpeg()),
        ("markup", "image/png", MARKUP),
    ]
    assert "arrows" not in str(sent.files[2].filename)  # never the client's filename
    assert image == RESULT_PNG
    assert hosted.headers["content-type"] == "image/png"
    assert hosted.content == RESULT_PNG


def test_markup_in_a_json_edit_is_an_image_reference(
    gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    def data_url(data: bytes) -> str:
        return "data:image/png;base64," + base64.b64encode(data).decode()

    response = httpx.post(
        gateway_url + "/v1/images/edits",
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
        json={
            "model": MODEL,
            "prompt": "circle the cat",
            "images": [{"image_url": data_url(PNG)}],
            "markup": {"image_url": data_url(MARKUP)},
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    files = upstream.edits[0].files
    assert [(f.field, f.content_type, f.data) for f in files] == [
        ("image", "image/png", PNG),
        ("markup", "image/png", MARKUP),
    ]


def test_an_svg_answer_that_is_not_svg_is_a_bad_answer(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(
        Reply(body=images_response(1, image=b"<html><script>alert(1)</script></html>"))
    )
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.edit(image=png_file(), prompt="x", model=MODEL, output_format="svg")
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_bad_response"


# (case, model, SDK arguments, the `param` the 400 names)
RULES: list[tuple[str, str, dict[str, Any], str]] = [
    ("frame_count without gif", MODEL, {"frame_count": 4}, "frame_count"),
    (
        "frame_count with png",
        MODEL,
        {"output_format": "png", "frame_count": 4},
        "frame_count",
    ),
    ("frame_duration_ms without gif", MODEL, {"frame_duration_ms": 100}, "frame_duration_ms"),
    ("frame_count under 2", MODEL, {"output_format": "gif", "frame_count": 1}, "frame_count"),
    ("frame_count over 16", MODEL, {"output_format": "gif", "frame_count": 17}, "frame_count"),
    (
        "frame_duration_ms under 20",
        MODEL,
        {"output_format": "gif", "frame_duration_ms": 19},
        "frame_duration_ms",
    ),
    ("gif with stream", MODEL, {"output_format": "gif", "stream": True}, "stream"),
    (
        "gif with partial_images",
        MODEL,
        {"output_format": "gif", "stream": True, "partial_images": 1},
        "partial_images",
    ),
    ("gif with mask", MODEL, {"output_format": "gif", "mask": "MASK"}, "mask"),
    (
        "gif with output_compression",
        MODEL,
        {"output_format": "gif", "output_compression": 50},
        "output_compression",
    ),
    ("svg with stream", MODEL, {"output_format": "svg", "stream": True}, "stream"),
    (
        "svg with partial_images",
        MODEL,
        {"output_format": "svg", "stream": True, "partial_images": 1},
        "partial_images",
    ),
    (
        "svg with output_compression",
        MODEL,
        {"output_format": "svg", "output_compression": 50},
        "output_compression",
    ),
    ("svg with n=2", MODEL, {"output_format": "svg", "n": 2}, "output_format"),
    ("gif on 2.5", "gpt-image-2.5-flare", {"output_format": "gif"}, "output_format"),
    ("svg on gpt-image-2", "gpt-image-2", {"output_format": "svg"}, "output_format"),
    ("complexity on 2.5", "gpt-image-2.5-sunburst", {"complexity": "low"}, "complexity"),
    ("complexity on gpt-image-2", "gpt-image-2", {"complexity": "high"}, "complexity"),
    ("complexity out of range", MODEL, {"complexity": "max"}, "complexity"),
    ("markup on gpt-image-2", "gpt-image-2", {"markup": "MARKUP"}, "markup"),
    ("markup with mask", MODEL, {"markup": "MARKUP", "mask": "MASK"}, "mask"),
    ("markup of another size", MODEL, {"markup": "MARKUP_32"}, "markup"),
    ("markup as JPEG", MODEL, {"markup": "JPEG"}, "markup"),
    ("markup without alpha", MODEL, {"markup": "OPAQUE"}, "markup"),
    ("input_fidelity on gpt-image-2", "gpt-image-2", {"input_fidelity": "low"}, "input_fidelity"),
    ("input_fidelity on 2.6", MODEL, {"input_fidelity": "high"}, "input_fidelity"),
    (
        "input_fidelity high on 1-mini",
        "gpt-image-1-mini",
        {"input_fidelity": "high"},
        "input_fidelity",
    ),
    ("custom size under the pixel floor", "gpt-image-2", {"size": "800x800"}, "size"),
    (
        "transparent background as jpeg",
        MODEL,
        {"background": "transparent", "output_format": "jpeg"},
        "background",
    ),
    (
        "output_compression with png",
        MODEL,
        {"output_format": "png", "output_compression": 50},
        "output_compression",
    ),
]
FILES = {
    "MASK": png_file(images.mask_png(64, 64), "mask.png"),
    "MARKUP": png_file(MARKUP, "markup.png"),
    "MARKUP_32": png_file(images.markup_png(32, 32), "markup.png"),
    "JPEG": png_file(images.jpeg(64, 64), "markup.png"),
    "OPAQUE": png_file(images.png(64, 64), "markup.png"),
}


@pytest.mark.parametrize(
    ("model", "arguments", "param"),
    [case[1:] for case in RULES],
    ids=[case[0] for case in RULES],
)
def test_each_rule_refuses_its_violation_before_the_upstream(
    client: OpenAI,
    upstream: FakeOpenAIUpstream,
    model: str,
    arguments: dict[str, Any],
    param: str,
) -> None:
    arguments = {
        name: FILES[value] if name in ("mask", "markup") else value
        for name, value in arguments.items()
    }
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=png_file(), prompt="x", model=model, **arguments)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param, error
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("model", "arguments"),
    [
        ("gpt-image-1.5", {"input_fidelity": "high"}),
        ("gpt-image-1-mini", {"input_fidelity": "low"}),
        ("gpt-image-2", {"size": "1024x640"}),  # exactly the 655,360-pixel floor
        (MODEL, {"output_format": "gif"}),
        (MODEL, {"output_format": "svg", "n": 1, "complexity": "medium"}),
        ("gpt-image-2.5-flare", {"markup": "MARKUP"}),
    ],
)
def test_what_the_rules_allow_reaches_the_upstream(
    client: OpenAI, upstream: FakeOpenAIUpstream, model: str, arguments: dict[str, Any]
) -> None:
    arguments = {
        name: FILES[value] if name == "markup" else value for name, value in arguments.items()
    }
    client.images.edit(image=png_file(), prompt="x", model=model, **arguments)
    sent = upstream.edits[0]
    fields = sent.field_map()
    for name, value in arguments.items():
        if name == "markup":
            assert [f.field for f in sent.files] == ["image", "markup"]
        else:
            assert fields[name] == str(value)
