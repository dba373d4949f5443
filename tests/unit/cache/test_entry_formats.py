"""Unit: GIF and SVG answers are recognised by their bytes before caching, rendered with their
own content type, and anything else an upstream sends is a bad answer."""

from __future__ import annotations

import asyncio
import base64

import pytest

from app.cache.entry import content_type_of, from_upstream, image_ext
from app.errors import UpstreamFailed
from tests.fakes.openai_upstream import RESULT_GIF, RESULT_SVG
from tests.support import images


async def _no_fetch(url: str) -> bytes:
    raise AssertionError("no URL to fetch")


def test_gif_is_recognised_by_its_magic_bytes() -> None:
    assert image_ext(RESULT_GIF) == "gif"
    assert image_ext(b"GIF87a" + RESULT_GIF[6:]) == "gif"
    assert content_type_of("gif") == "image/gif"


@pytest.mark.parametrize(
    "svg",
    [
        RESULT_SVG,
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
        b"\xef\xbb\xbf  <!-- made by a model -->\n<!DOCTYPE svg>\n<svg>\n</svg>",
    ],
)
def test_svg_is_text_whose_root_element_is_svg(svg: bytes) -> None:
    assert image_ext(svg) == "svg"
    assert content_type_of("svg") == "image/svg+xml"


@pytest.mark.parametrize(
    "junk",
    [
        b"<html><body><svg></svg></body></html>",
        b'{"error": "not an image"}',
        b"<svgx/>",
        b"\xff\xfe<\x00s\x00v\x00g\x00",  # UTF-16 is not what OpenAI sends
        b"GIF8",
        images.other_format("bmp"),
    ],
)
def test_anything_else_is_a_bad_answer(junk: bytes) -> None:
    with pytest.raises(UpstreamFailed) as caught:
        image_ext(junk)
    assert caught.value.failure == "bad_response"


def test_an_svg_answer_renders_as_b64_and_as_a_hosted_svg_url() -> None:
    body = {"created": 1, "data": [{"b64_json": base64.b64encode(RESULT_SVG).decode()}]}
    entry = asyncio.run(from_upstream(body, _no_fetch, now=0.0))
    assert [image.ext for image in entry.images] == ["svg"]
    rendered = entry.render("url", lambda file_id, ext: f"https://gw/{file_id}.{ext}")
    # Not yet hosted (no file id): the data URL carries the SVG's own media type.
    assert rendered["data"][0]["url"].startswith("data:image/svg+xml;base64,")
    assert base64.b64decode(entry.render("b64_json", str)["data"][0]["b64_json"]) == RESULT_SVG
