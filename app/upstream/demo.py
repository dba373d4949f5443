"""The built-in demo upstream (`--demo`): a real, cheap, deterministic edit done locally.

It tints the first image towards a colour derived from the prompt (only inside the mask's
transparent area when a mask is given), so a newcomer sees the whole path work offline.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from typing import Any

from PIL import Image

from app.edit import EditRequest
from app.upstream.base import UpstreamAnswer, UpstreamKey

# Demo output is capped so a large upload cannot make the demo slow.
MAX_EDGE = 1024


class DemoUpstream:
    def __init__(self, name: str = "demo") -> None:
        self.name = name

    async def edit(self, edit: EditRequest, key: UpstreamKey | None) -> UpstreamAnswer:
        images = await asyncio.to_thread(_render_all, edit)
        if edit.response_format == "url":
            data = [{"url": "data:image/png;base64," + image} for image in images]
        else:
            data = [{"b64_json": image} for image in images]
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": data,
            "output_format": "png",
            "usage": {
                "input_tokens": 0,
                "output_tokens": 0,
                "total_tokens": 0,
                "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
            },
        }
        return UpstreamAnswer(body=body, request_id=None)


def _prompt_colour(prompt: str) -> tuple[int, int, int]:
    digest = hashlib.sha256(prompt.encode()).digest()
    return digest[0], digest[1], digest[2]


def _render_all(edit: EditRequest) -> list[str]:
    with Image.open(io.BytesIO(edit.images[0].upload.read_all())) as source:
        source.draft("RGB", (MAX_EDGE, MAX_EDGE))
        base = source.convert("RGBA")
    mask = None
    if edit.mask is not None:
        with Image.open(io.BytesIO(edit.mask.upload.read_all())) as mask_image:
            # Transparent mask pixels mark the area to edit.
            mask = mask_image.convert("RGBA").getchannel("A").point(lambda a: 255 - a)
    base.thumbnail((MAX_EDGE, MAX_EDGE))
    if mask is not None:
        mask = mask.resize(base.size)
    colour = _prompt_colour(edit.prompt)
    results = []
    for variant in range(edit.n):
        strength = min(0.35 + 0.15 * variant, 0.8)
        overlay = Image.new("RGBA", base.size, (*colour, 255))
        tinted = Image.blend(base, overlay, strength)
        tinted.putalpha(base.getchannel("A"))
        out = Image.composite(tinted, base, mask) if mask is not None else tinted
        buffer = io.BytesIO()
        out.save(buffer, format="PNG")
        results.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return results
