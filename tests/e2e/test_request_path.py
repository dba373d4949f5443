"""Acceptance for the fast request path: uploads above the spool threshold reach the upstream
byte for byte, and header sniffing still finds what lies beyond its first quick read."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

from openai import OpenAI
from PIL import Image

from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def test_large_and_small_uploads_reach_upstream_intact(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    # 3.6 MB crosses the 2 MiB spool threshold (temp file, worker-thread writes, 1 MiB sends);
    # the others stay in memory and are coalesced into shared writes.
    sources = [images.noise_png(1100, 1100, seed=1), images.png(40, 40), images.jpeg(30, 20)]
    client.images.edit(
        image=[("a.png", sources[0]), ("b.png", sources[1]), ("c.jpg", sources[2])],
        prompt="keep every byte",
    )
    (sent,) = upstream.edits
    assert [(f.field, f.sha256) for f in sent.files] == [("image[]", sha(s)) for s in sources]
    assert sent.field_map()["prompt"] == "keep every byte"


def test_jpeg_frame_header_behind_large_exif_is_found(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    plain = images.jpeg(48, 36)
    exif = b"Exif\x00\x00" + bytes(60_000)  # pushes the SOF marker past the quick 16 KiB head
    source = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + plain[2:]
    client.images.edit(image=("photo.jpg", source), prompt="x")
    (sent,) = upstream.edits
    assert [(f.content_type, f.sha256) for f in sent.files] == [("image/jpeg", sha(source))]


def test_palette_mask_with_transparency_behind_large_chunk_is_accepted(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    buffer = io.BytesIO()
    Image.new("P", (64, 64), 0).save(buffer, format="PNG", transparency=0)
    palette_png = buffer.getvalue()
    # A 20 KB text chunk right after IHDR puts tRNS beyond the quick head read.
    text = _chunk(b"tEXt", b"Comment\x00" + b"a" * 20_000)
    mask = palette_png[:33] + text + palette_png[33:]
    source = images.png(64, 64)
    client.images.edit(image=("a.png", source), mask=("m.png", mask), prompt="x")
    (sent,) = upstream.edits
    assert [(f.field, f.sha256) for f in sent.files] == [
        ("image", sha(source)),
        ("mask", sha(mask)),
    ]


def test_request_ids_are_unique_and_opaque(gateway_url: str) -> None:
    import re

    import httpx

    ids = [httpx.get(gateway_url + "/healthz").headers["x-request-id"] for _ in range(50)]
    assert len(set(ids)) == 50
    assert all(re.fullmatch(r"req_[0-9a-f]{24}", request_id) for request_id in ids)
