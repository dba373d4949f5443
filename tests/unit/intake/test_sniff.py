"""Image format and size from headers only."""

from __future__ import annotations

import pytest

from app.intake.sniff import SniffError, sniff_image
from tests.support import images


def sniff(data: bytes) -> tuple[str, int, int, bool]:
    info = sniff_image(data[: 512 * 1024], data[-64:], len(data))
    return info.kind, info.width, info.height, info.has_alpha


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (images.png(64, 32), ("png", 64, 32, False)),
        (images.png(10, 20, mode="RGBA"), ("png", 10, 20, True)),
        (images.png(10, 20, mode="LA", colour=(1, 2)), ("png", 10, 20, True)),
        (images.jpeg(80, 60), ("jpeg", 80, 60, False)),
        (images.webp(40, 30), ("webp", 40, 30, False)),
        (images.webp(41, 31, lossless=True), ("webp", 41, 31, False)),
        (images.png_bomb_header(), ("png", 100_000, 100_000, False)),
    ],
)
def test_sniff_reads_kind_and_size(data: bytes, expected: tuple[str, int, int, bool]) -> None:
    assert sniff(data) == expected


def test_sniff_palette_png_with_transparency_has_alpha() -> None:
    import io

    from PIL import Image

    image = Image.new("P", (8, 8), 0)
    image.info["transparency"] = 0
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    assert sniff(buffer.getvalue())[3] is True


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"plain text, not an image", "not a PNG"),
        (images.png()[:-12], "truncated"),
        (images.png()[:20], "truncated"),
        (images.jpeg()[:-2], "truncated"),
        (images.webp()[:-4], "truncated"),
        (images.other_format("gif"), "GIF"),
        (images.other_format("bmp"), "BMP"),
        (images.other_format("tiff"), "TIFF"),
        (images.other_format("svg"), "SVG"),
    ],
)
def test_sniff_rejects(data: bytes, message: str) -> None:
    with pytest.raises(SniffError, match=message):
        sniff(data if data else b"")
