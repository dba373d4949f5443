"""The built-in demo upstream (`--demo`): a real, cheap, deterministic edit done locally.

It tints the first image towards a colour derived from the prompt (only inside the mask's
transparent area when a mask is given), so a newcomer sees the whole path work offline. A
generation paints a gradient in the prompt's colours: the same prompt, the same image.

The output options a real upstream honours are honoured here too, so they can be tried offline:
`size` (WxH; the catalog turns `aspect_ratio` into a size for GPT image models) and
`aspect_ratio` (models that take it as is, e.g. FLUX) set the output's dimensions, the source
cropped to fit around its centre; `output_format` (png, jpeg, webp) sets the encoding.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import time
from typing import Any

from PIL import Image, ImageOps

from app.intake.request import EditRequest
from app.upstream.base import PartialSink, UpstreamAnswer, UpstreamKey

# Demo output is capped so a large upload or size cannot make the demo slow: a source is read at
# most MAX_EDGE on its longest side, and a requested size above MAX_PIXELS is scaled down to it
# (aspect ratio kept). The catalog's fixed sizes (up to 1536x1024) are served exactly.
MAX_EDGE = 1024
MAX_PIXELS = 2048 * 2048
GENERATED_EDGE = 256
# output_format -> (Pillow's format name, media type).
FORMATS = {
    "png": ("PNG", "image/png"),
    "jpeg": ("JPEG", "image/jpeg"),
    "webp": ("WEBP", "image/webp"),
}


class DemoUpstream:
    def __init__(self, name: str = "demo") -> None:
        self.name = name

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        render = _render_all if edit.operation == "edit" else _generate_all
        images = await asyncio.to_thread(render, edit)
        output_format = _output_format(edit)
        if edit.response_format == "url":
            media_type = FORMATS[output_format][1]
            data = [{"url": f"data:{media_type};base64," + image} for image in images]
        else:
            data = [{"b64_json": image} for image in images]
        body: dict[str, Any] = {
            "created": int(time.time()),
            "data": data,
            "output_format": output_format,
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


def _output_format(edit: EditRequest) -> str:
    requested = str(edit.params.get("output_format", "png"))
    return requested if requested in FORMATS else "png"


def _encode(image: Image.Image, output_format: str) -> str:
    """base64 of `image` in `output_format` (JPEG has no alpha: flattened onto white)."""
    if output_format == "jpeg" and image.mode != "RGB":
        flat = Image.new("RGB", image.size, (255, 255, 255))
        flat.paste(image, mask=image.getchannel("A") if "A" in image.getbands() else None)
        image = flat
    buffer = io.BytesIO()
    image.save(buffer, format=FORMATS[output_format][0])
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _within_cap(width: int, height: int) -> tuple[int, int]:
    scale = min(1.0, (MAX_PIXELS / max(width * height, 1)) ** 0.5)
    return max(1, int(width * scale)), max(1, int(height * scale))


def _requested_size(edit: EditRequest, natural: tuple[int, int]) -> tuple[int, int]:
    """The output's dimensions: `size` (WxH), else `aspect_ratio` (W:H) cropped from `natural`,
    else `natural` itself (the source's size for an edit)."""
    width, _, height = str(edit.params.get("size", "")).partition("x")
    if width.isdigit() and height.isdigit():
        return _within_cap(int(width), int(height))
    across, _, down = str(edit.params.get("aspect_ratio", "")).partition(":")
    if across.isdigit() and down.isdigit() and int(across) > 0 and int(down) > 0:
        # The largest W:H box inside `natural`: a crop, never an enlargement.
        ratio = int(across) / int(down)
        box_width = min(natural[0], round(natural[1] * ratio))
        box_height = min(natural[1], round(natural[0] / ratio))
        return max(1, box_width), max(1, box_height)
    return natural


def _generate_all(edit: EditRequest) -> list[str]:
    width, height = _requested_size(edit, (GENERATED_EDGE, GENERATED_EDGE))
    output_format = _output_format(edit)
    start = _prompt_colour(edit.prompt)
    end = _prompt_colour(edit.prompt[::-1] + "|end")
    results = []
    for variant in range(edit.n):
        # A horizontal gradient, shifted per variant so n images differ from each other.
        ramp = Image.linear_gradient("L").rotate(90 * variant).resize((width, height))
        image = Image.composite(
            Image.new("RGB", (width, height), end), Image.new("RGB", (width, height), start), ramp
        )
        results.append(_encode(image, output_format))
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
    size = _requested_size(edit, base.size)
    if size != base.size:
        # Scaled to cover `size`, then cropped around the centre: the mask follows the image.
        base = ImageOps.fit(base, size)
        mask = ImageOps.fit(mask, size) if mask is not None else None
    output_format = _output_format(edit)
    colour = _prompt_colour(edit.prompt)
    results = []
    for variant in range(edit.n):
        strength = min(0.35 + 0.15 * variant, 0.8)
        overlay = Image.new("RGBA", base.size, (*colour, 255))
        tinted = Image.blend(base, overlay, strength)
        tinted.putalpha(base.getchannel("A"))
        out = Image.composite(tinted, base, mask) if mask is not None else tinted
        results.append(_encode(out, output_format))
    return results
