"""Acceptance: the demo upstream honours `size` and `aspect_ratio` (the output's dimensions) and
`output_format` (the encoding) on edits, through the real SDK, as a real upstream would."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import pytest
from openai import OpenAI
from PIL import Image

from app.config.settings import load_settings
from app.main import create_app
from tests.support import images
from tests.support.constants import CONFIG
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

GREY = (120, 120, 120)


@pytest.fixture(scope="module")
def demo() -> Iterator[OpenAI]:
    settings = load_settings(env={"GATEWAY_CONFIG": str(CONFIG)}, demo=True)
    with serve_in_thread(create_app(settings)) as url:
        yield sdk_client(url, key="demo")


def edit(client: OpenAI, **options: Any) -> tuple[Image.Image, Any]:
    result = client.images.edit(
        image=("in.png", images.png(96, 64, colour=GREY), "image/png"),
        prompt="honour my options",
        **options,
    )
    assert result.data is not None and result.data[0].b64_json is not None
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    image.load()
    return image, result


@pytest.mark.parametrize(
    ("model", "options", "size"),
    [
        # No size: the source's own dimensions.
        ("gpt-image-1.5", {}, (96, 64)),
        ("gpt-image-1.5", {"size": "1536x1024"}, (1536, 1024)),
        ("gpt-image-1.5", {"size": "1024x1536"}, (1024, 1536)),
        # aspect_ratio, turned into the nearest size by the catalog for GPT image models.
        ("gpt-image-1.5", {"extra_body": {"aspect_ratio": "9:16"}}, (1024, 1536)),
        ("gpt-image-2", {"extra_body": {"aspect_ratio": "4:3"}}, (1280, 960)),
        # A model that takes aspect_ratio as is: the source cropped to it.
        ("flux-kontext-pro", {"extra_body": {"aspect_ratio": "1:1"}}, (64, 64)),
        ("flux-kontext-pro", {"extra_body": {"aspect_ratio": "16:9"}}, (96, 54)),
    ],
)
def test_demo_edit_has_the_requested_dimensions(
    demo: OpenAI, model: str, options: dict[str, Any], size: tuple[int, int]
) -> None:
    image, _ = edit(demo, model=model, **options)
    assert image.size == size
    assert image.convert("RGB").getpixel((size[0] // 2, size[1] // 2)) != GREY  # still edited


@pytest.mark.parametrize(
    ("output_format", "pillow_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_demo_edit_is_encoded_in_the_requested_format(
    demo: OpenAI, output_format: str, pillow_format: str
) -> None:
    image, result = edit(demo, model="gpt-image-1.5", output_format=output_format)
    assert image.format == pillow_format and image.size == (96, 64)
    assert result.output_format == output_format


def test_demo_edit_combines_size_and_format(demo: OpenAI) -> None:
    image, result = edit(demo, model="gpt-image-1.5", size="1024x1024", output_format="jpeg")
    assert (image.format, image.size, result.output_format) == ("JPEG", (1024, 1024), "jpeg")
