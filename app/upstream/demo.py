"""The built-in demo upstream (`--demo`): a real, cheap, deterministic edit done locally.

It tints the first image towards a colour derived from the prompt (only inside the mask's
transparent area when a mask is given), so a newcomer sees the whole path work offline. A
generation paints a gradient in the prompt's colours: the same prompt, the same image.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from typing import Any

from PIL import Image

from app.intake.request import EditRequest
from app.upstream.base import PartialSink, UpstreamAnswer, UpstreamKey

# Demo output is capped so a large upload cannot make the demo slow.
MAX_EDGE = 1024
GENERATED_EDGE = 256


class DemoUpstream:
    def __init__(self, name: str = "demo") -> None:
        self.name = name

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        render = _render_all if edit.operation == "edit" else _generate_all
        images = await asyncio.to_thread(render, edit)
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


def _generated_size(edit: EditRequest) -> tuple[int, int]:
    size = str(edit.params.get("size", ""))
    width, _, height = size.partition("x")
    if width.isdigit() and height.isdigit():
        scale = min(1.0, MAX_EDGE / max(int(width), int(height), 1))
        return max(1, int(int(width) * scale)), max(1, int(int(height) * scale))
    return GENERATED_EDGE, GENERATED_EDGE


def _generate_all(edit: EditRequest) -> list[str]:
    width, height = _generated_size(edit)
    start = _prompt_colour(edit.prompt)
    end = _prompt_colour(edit.prompt[::-1] + "|end")
    results = []
    for variant in range(edit.n):
        # A horizontal gradient, shifted per variant so n images differ from each other.
        ramp = Image.linear_gradient("L").rotate(90 * variant).resize((width, height))
        image = Image.composite(
            Image.new("RGB", (width, height), end), Image.new("RGB", (width, height), start), ramp
        )
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        results.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return results


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
