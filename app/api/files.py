"""GET /v1/images/files/{id}.{ext}: the image bytes behind the URLs the gateway hands out.

Public unless `cache.files_require_auth`: ids are 192 random bits, so a URL is its own
capability, as with the upstreams' signed URLs it replaces (but alive for the entry's TTL).
"""

from __future__ import annotations

import re

from fastapi import APIRouter
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.cache.entry import content_type_of
from app.errors import NotFound, Overloaded, StoreUnavailable

router = APIRouter()

# The raw paths the auth middleware may let through without a key (and nothing else). The URLs
# are built by app/service/edits.file_url.
FILE_PATH = re.compile(r"/v1/images/files/[A-Za-z0-9_-]{32}\.(?:png|jpeg|webp|gif|svg)")
_NAME = re.compile(r"([A-Za-z0-9_-]{32})\.(png|jpeg|webp|gif|svg)")
# An SVG is a document that could carry scripts: served as an image that runs nothing, loads
# nothing and is never sniffed into something else (inline styles are how SVGs draw).
_SVG_HEADERS = {"content-security-policy": "default-src 'none'; style-src 'unsafe-inline'"}


def _not_found() -> NotFound:
    return NotFound(
        "No such image file; gateway image URLs expire with their cache entry.",
        code="file_not_found",
    )


@router.get("/v1/images/files/{name}")
async def get_image_file(name: str, gateway: GatewayDep) -> Response:
    match = _NAME.fullmatch(name)
    if match is None:
        raise _not_found()
    file_id, ext = match.groups()
    try:
        found = await gateway.cache.store.get_file(file_id, ext)
    except StoreUnavailable:
        raise Overloaded(
            "The image store is unavailable; retry shortly.", code="image_store_unavailable"
        ) from None
    if found is None:
        raise _not_found()
    max_age = int(found.ttl_seconds) if found.ttl_seconds is not None else 0
    return Response(
        found.data,
        media_type=content_type_of(ext),
        headers={
            # The bytes behind an id never change.
            "cache-control": f"public, max-age={max_age}, immutable",
            "x-content-type-options": "nosniff",
            **(_SVG_HEADERS if ext == "svg" else {}),
        },
    )
