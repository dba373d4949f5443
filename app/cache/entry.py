"""A finished edit as the cache keeps it: the response's metadata once, each image as raw bytes.

Bytes are stored once (never base64 twice) and rendered per request: base64 for `b64_json`, or a
gateway-hosted URL for `url`, so one entry answers both.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from app.errors import UpstreamFailed

FetchImage = Callable[[str], Awaitable[bytes]]

_CONTENT_TYPES = {
    "png": "image/png",
    "jpeg": "image/jpeg",
    "webp": "image/webp",
    "gif": "image/gif",
    "svg": "image/svg+xml",
}
# An SVG's root element must show within this many characters (after a BOM, the XML
# declaration, comments and a doctype).
_SVG_PROLOGUE_CHARS = 4096
_SVG_ROOT = re.compile(
    r"\A\s*(?:<\?xml[^>]*\?>\s*)?(?:(?:<!--.*?-->|<!DOCTYPE[^>]*>)\s*)*<svg[\s>/]",
    re.DOTALL | re.IGNORECASE,
)


def content_type_of(ext: str) -> str:
    return _CONTENT_TYPES[ext]


def image_ext(data: bytes) -> str:
    """The file extension of image bytes by their magic number (what the files route serves);
    an SVG by being UTF-8 text whose root element is `<svg>`."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if _is_svg(data):
        return "svg"
    raise _bad_answer("an image that is not PNG, JPEG, WebP, GIF or SVG")


def _is_svg(data: bytes) -> bool:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return _SVG_ROOT.match(text.removeprefix("\ufeff")[:_SVG_PROLOGUE_CHARS]) is not None


@dataclass(frozen=True, slots=True)
class StoredImage:
    data: bytes
    ext: str
    # The id of its hosted file, once stored; None while only held in memory.
    file_id: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. revised_prompt


@dataclass(frozen=True, slots=True)
class CachedEdit:
    body: dict[str, Any]  # the ImagesResponse without `data`
    images: tuple[StoredImage, ...]
    stored_at: float

    @property
    def image_bytes(self) -> int:
        return sum(len(image.data) for image in self.images)

    def render(self, response_format: str, file_url: Callable[[str, str], str]) -> dict[str, Any]:
        """The ImagesResponse for a client; `url` needs every image to have a hosted file."""
        data: list[dict[str, Any]] = []
        for image in self.images:
            item = dict(image.extras)
            if response_format == "url":
                if image.file_id is not None:
                    item["url"] = file_url(image.file_id, image.ext)
                else:
                    # No store to host it (Redis down): a data URL still carries the image.
                    encoded = base64.b64encode(image.data).decode("ascii")
                    item["url"] = f"data:{content_type_of(image.ext)};base64,{encoded}"
            else:
                item["b64_json"] = base64.b64encode(image.data).decode("ascii")
            data.append(item)
        return {**self.body, "data": data}

    def meta(self) -> bytes:
        """The entry without image bytes: what the store keeps under the fingerprint."""
        return orjson.dumps(
            {
                "body": self.body,
                "stored_at": self.stored_at,
                "images": [
                    {"id": image.file_id, "ext": image.ext, "size": len(image.data), **image.extras}
                    for image in self.images
                ],
            }
        )


@dataclass(frozen=True, slots=True)
class EntryMeta:
    body: dict[str, Any]
    stored_at: float
    files: tuple[tuple[str, str, dict[str, Any]], ...]  # (file id, ext, extras)

    @classmethod
    def parse(cls, raw: bytes) -> EntryMeta:
        value = orjson.loads(raw)
        files = tuple(
            (
                str(item.pop("id")),
                str(item.pop("ext")),
                {k: v for k, v in item.items() if k != "size"},
            )
            for item in value["images"]
        )
        return cls(body=value["body"], stored_at=float(value["stored_at"]), files=files)

    def with_bytes(self, blobs: list[bytes]) -> CachedEdit:
        images = tuple(
            StoredImage(data=blob, ext=ext, file_id=file_id, extras=extras)
            for (file_id, ext, extras), blob in zip(self.files, blobs, strict=True)
        )
        return CachedEdit(body=self.body, images=images, stored_at=self.stored_at)


async def from_upstream(body: dict[str, Any], fetch: FetchImage, now: float) -> CachedEdit:
    """Turn an upstream ImagesResponse into bytes: decode base64, download URLs at once."""
    items = body.get("data")
    if not isinstance(items, list) or not items:
        raise _bad_answer("no images")
    images = []
    for item in items:
        if not isinstance(item, dict):
            raise _bad_answer("a data item that is not an object")
        extras = {k: v for k, v in item.items() if k not in ("b64_json", "url")}
        b64 = item.get("b64_json")
        url = item.get("url")
        if isinstance(b64, str) and b64:
            data = _b64decode(b64)
        elif isinstance(url, str) and url.startswith("data:"):
            data = _data_url(url)
        elif isinstance(url, str) and url:
            data = await fetch(url)
        else:
            raise _bad_answer("a data item with neither b64_json nor url")
        images.append(StoredImage(data=data, ext=image_ext(data), extras=extras))
    rest = {k: v for k, v in body.items() if k != "data"}
    return CachedEdit(body=rest, images=tuple(images), stored_at=now)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad_answer("b64_json that is not valid base64") from None


def _data_url(url: str) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64"):
        raise _bad_answer("a data URL that is not base64")
    return _b64decode(payload)


def _bad_answer(what: str) -> UpstreamFailed:
    return UpstreamFailed(
        f"The upstream answered with {what}.", code="upstream_bad_response", failure="bad_response"
    )
