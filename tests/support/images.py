"""Test images made by code: real PNG/JPEG/WebP files and deliberately broken ones."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image


def png(width: int = 64, height: int = 64, *, mode: str = "RGB", colour: object = None) -> bytes:
    fill = (
        colour if colour is not None else ((10, 120, 200, 255) if "A" in mode else (10, 120, 200))
    )
    if mode == "L":
        fill = 128 if colour is None else colour
    buffer = io.BytesIO()
    Image.new(mode, (width, height), fill).save(buffer, format="PNG")  # type: ignore[arg-type]
    return buffer.getvalue()


def mask_png(width: int = 64, height: int = 64) -> bytes:
    """An RGBA mask whose left half is transparent (the area to edit)."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    for x in range(width // 2):
        for y in range(height):
            image.putpixel((x, y), (0, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, format="JPEG")
    return buffer.getvalue()


def webp(width: int = 40, height: int = 30, *, lossless: bool = False) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (30, 200, 30)).save(buffer, format="WEBP", lossless=lossless)
    return buffer.getvalue()


def animated_gif(width: int = 16, height: int = 16, *, frames: int = 3) -> bytes:
    """A real animated GIF: `frames` frames of different colours, 200 ms each."""
    shots = [Image.new("P", (width, height), index * 40) for index in range(frames)]
    buffer = io.BytesIO()
    shots[0].save(buffer, format="GIF", save_all=True, append_images=shots[1:], duration=200)
    return buffer.getvalue()


def markup_png(width: int = 64, height: int = 64) -> bytes:
    """A markup layer: transparent everywhere except a red stroke across the middle."""
    image = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    for x in range(width):
        image.putpixel((x, height // 2), (255, 0, 0, 255))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def other_format(kind: str) -> bytes:
    if kind == "svg":
        return (
            b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>'
        )
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buffer, format=kind.upper())
    return buffer.getvalue()


def png_bomb_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny, well-formed PNG whose IHDR claims a huge image (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def noise_png(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG that does not compress (for size-limit tests and benchmarks)."""
    import random

    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()
