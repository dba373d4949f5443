"""OpenAI's `size` and the reseller's `aspect_ratio`, mapped onto a BFL model's size mode.

FLUX.2 takes `width` and `height` (multiples of 16, at least 64, at most 4 MP, any ratio);
FLUX.1 Kontext takes `aspect_ratio` itself. The catalog's `bfl.size` says which, with its bounds.
"""

from __future__ import annotations

import math
import re

from app.config.catalog import BflSize
from app.errors import InvalidRequest
from app.intake.request import ParamValue

_SIZE = re.compile(r"^([0-9]{1,5})x([0-9]{1,5})$")
_RATIO = re.compile(r"^([0-9]{1,3}):([0-9]{1,3})$")
# How far (as a factor) an aspect_ratio's dimensions may stray from the exact ratio: with sides
# in multiples of 16 most ratios cannot be met exactly at ~1 MP (16:9 exactly is 1280x720 or
# 1536x864); 1% is below what anyone sees.
RATIO_TOLERANCE = 1.01


def size_fields(
    rule: BflSize, size: ParamValue | None, aspect_ratio: ParamValue | None
) -> dict[str, ParamValue]:
    """The size fields of a BFL task body for the client's `size` and `aspect_ratio` (after the
    catalog's translation). Nothing when neither is given, or for `size=auto`: BFL then keeps the
    input image's size (or its own default for a generation)."""
    if rule.mode == "aspect_ratio":
        # Kontext: the catalog has already translated size into aspect_ratio.
        return {} if aspect_ratio is None else {"aspect_ratio": aspect_ratio}
    explicit = size is not None and str(size) != "auto"
    if explicit and aspect_ratio is not None:
        raise InvalidRequest(
            "Send either size or aspect_ratio, not both: both set the output's dimensions.",
            param="aspect_ratio",
            code="conflicting_parameters",
        )
    if explicit:
        width, height = _checked_size(rule, str(size))
    elif aspect_ratio is not None:
        width, height = ratio_dimensions(rule, str(aspect_ratio))
    else:
        return {}
    return {"width": width, "height": height}


def _checked_size(rule: BflSize, size: str) -> tuple[int, int]:
    match = _SIZE.match(size)
    width, height = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
    fits = (
        width % rule.multiple_of == 0
        and height % rule.multiple_of == 0
        and min(width, height) >= rule.min_side
        and width * height <= rule.max_pixels
    )
    if not fits:
        raise InvalidRequest(
            f"Invalid value for size: {size[:60]!r}; expected WxH with both sides multiples of "
            f"{rule.multiple_of}, at least {rule.min_side}, and at most {rule.max_pixels} "
            "pixels in all.",
            param="size",
            code="invalid_value",
        )
    return width, height


def ratio_dimensions(rule: BflSize, aspect_ratio: str) -> tuple[int, int]:
    """The largest width x height, both multiples of `multiple_of` and at least `min_side`,
    within `ratio_pixels` and within 1% of the ratio (e.g. 16:9 -> 1360x768 at 1 MP). The same
    rule both ways round, so 9:16 is 768x1360."""
    match = _RATIO.match(aspect_ratio)
    if match is None or int(match.group(1)) == 0 or int(match.group(2)) == 0:
        raise InvalidRequest(
            f"Invalid value for aspect_ratio: {aspect_ratio[:60]!r}; expected W:H, e.g. 16:9.",
            param="aspect_ratio",
            code="invalid_value",
        )
    ratio = int(match.group(1)) / int(match.group(2))
    step, budget = rule.multiple_of, rule.ratio_pixels
    best: tuple[int, float, int, int] | None = None  # (area, -error, width, height)
    lowest = math.ceil(rule.min_side / step) * step
    for width in range(lowest, budget // lowest + 1, step):
        # Every height within the tolerance, so the rule reads the same both ways round.
        shortest = math.ceil(width / ratio / RATIO_TOLERANCE / step) * step
        tallest = math.floor(width / ratio * RATIO_TOLERANCE / step) * step
        for height in range(max(shortest, lowest), tallest + 1, step):
            if width * height > budget:
                break
            error = abs(math.log(width / height / ratio))
            if error > math.log(RATIO_TOLERANCE):
                continue
            candidate = (width * height, -error, width, height)
            if best is None or candidate > best:
                best = candidate
    if best is None:
        raise InvalidRequest(
            f"aspect_ratio {aspect_ratio!r} cannot be met within this model's size rules.",
            param="aspect_ratio",
            code="invalid_value",
        )
    return best[2], best[3]
