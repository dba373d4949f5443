"""Image format and dimensions from magic bytes and headers only, never a full decode.

A decompression bomb costs nothing here: width and height come from a few header bytes and are
checked against a pixel cap before anything else looks at the image. Truncation is caught from
each format's framing (PNG's IEND chunk, JPEG's EOI marker, the RIFF length of WebP).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

ImageKind = Literal["png", "jpeg", "webp"]
MIME_TYPES: dict[ImageKind, str] = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# How much of the file sniffing may read: JPEG frame headers can sit behind large EXIF/ICC blocks.
HEAD_BYTES = 512 * 1024
# Trailing padding after the end marker is common in camera JPEGs; allow some.
TAIL_BYTES = 1024


class SniffError(ValueError):
    """The bytes are not a usable PNG, JPEG or WebP image; the message says why."""


@dataclass(frozen=True, slots=True)
class ImageInfo:
    kind: ImageKind
    width: int
    height: int
    has_alpha: bool

    @property
    def mime_type(self) -> str:
        return MIME_TYPES[self.kind]


_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"%PDF", "PDF"),
)


def sniff_image(head: bytes, tail: bytes, size: int) -> ImageInfo:
    """Identify an image from its first bytes (`head`) and last bytes (`tail`)."""
    if size == 0:
        raise SniffError("the file is empty")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(head, tail)
    if head.startswith(b"\xff\xd8\xff"):
        return _jpeg(head, tail)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return _webp(head, size)
    for magic, name in _OTHER_FORMATS:
        if head.startswith(magic):
            raise SniffError(f"the file is a {name} image; only PNG, JPEG and WebP are accepted")
    if head[12:20] in (b"ftypavif", b"ftypheic", b"ftypmif1") or head[4:12] in (
        b"ftypavif",
        b"ftypheic",
    ):
        raise SniffError("the file is an AVIF/HEIC image; only PNG, JPEG and WebP are accepted")
    stripped = head[:256].lstrip()
    if stripped[:5].lower() in (b"<?xml", b"<svg ", b"<svg>") or b"<svg" in stripped[:256].lower():
        raise SniffError("the file is an SVG image; only PNG, JPEG and WebP are accepted")
    raise SniffError("the file is not a PNG, JPEG or WebP image")


def _png(head: bytes, tail: bytes) -> ImageInfo:
    # Signature (8) + IHDR length (4) + "IHDR" (4) + width, height, depth, color type.
    if len(head) < 33 or head[12:16] != b"IHDR":
        raise SniffError("the PNG is truncated or malformed (no IHDR header)")
    width, height = struct.unpack(">II", head[16:24])
    color_type = head[25]
    if b"IEND\xaeB`\x82" not in tail:
        raise SniffError("the PNG is truncated (it does not end with an IEND chunk)")
    has_alpha = color_type in (4, 6) or _png_has_trns(head)
    return _checked("png", width, height, has_alpha)


def _png_has_trns(head: bytes) -> bool:
    """A palette or greyscale PNG carries transparency in a tRNS chunk before the image data."""
    offset = 8
    while offset + 8 <= len(head):
        length = struct.unpack(">I", head[offset : offset + 4])[0]
        chunk_type = head[offset + 4 : offset + 8]
        if chunk_type == b"tRNS":
            return True
        if chunk_type in (b"IDAT", b"IEND"):
            return False
        offset += 12 + length
    return False


# SOF markers carry the frame size; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg(head: bytes, tail: bytes) -> ImageInfo:
    if b"\xff\xd9" not in tail:
        raise SniffError("the JPEG is truncated (it does not end with an EOI marker)")
    offset = 2
    while offset + 4 <= len(head):
        if head[offset] != 0xFF:
            raise SniffError("the JPEG is malformed (bad marker)")
        marker = head[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            offset += 2
            continue
        (length,) = struct.unpack(">H", head[offset + 2 : offset + 4])
        if length < 2:
            raise SniffError("the JPEG is malformed (bad segment length)")
        if marker in _SOF_MARKERS:
            if offset + 9 > len(head):
                break
            height, width = struct.unpack(">HH", head[offset + 5 : offset + 9])
            return _checked("jpeg", width, height, False)
        if marker == 0xDA:  # start of scan before any frame header
            break
        offset += 2 + length
    raise SniffError("the JPEG is truncated or malformed (no frame header)")


def _webp(head: bytes, size: int) -> ImageInfo:
    (riff_size,) = struct.unpack("<I", head[4:8])
    if riff_size + 8 > size:
        raise SniffError("the WebP is truncated (shorter than its RIFF header says)")
    chunk = head[12:16]
    if chunk == b"VP8X" and len(head) >= 30:
        flags = head[20]
        width = 1 + int.from_bytes(head[24:27], "little")
        height = 1 + int.from_bytes(head[27:30], "little")
        return _checked("webp", width, height, bool(flags & 0x10))
    if chunk == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        width = (bits & 0x3FFF) + 1
        height = ((bits >> 14) & 0x3FFF) + 1
        return _checked("webp", width, height, bool((bits >> 28) & 1))
    if chunk == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        width = int.from_bytes(head[26:28], "little") & 0x3FFF
        height = int.from_bytes(head[28:30], "little") & 0x3FFF
        return _checked("webp", width, height, False)
    raise SniffError("the WebP is truncated or malformed (no VP8/VP8L/VP8X header)")


def _checked(kind: ImageKind, width: int, height: int, has_alpha: bool) -> ImageInfo:
    if width <= 0 or height <= 0:
        raise SniffError(f"the {kind.upper()} header claims a {width}x{height} image")
    return ImageInfo(kind=kind, width=width, height=height, has_alpha=has_alpha)
