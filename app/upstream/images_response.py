"""Shape an upstream's answer into OpenAI's ImagesResponse, as strict clients expect it."""

from __future__ import annotations

import time
from typing import Any

_ZERO_INPUT_DETAILS = {"text_tokens": 0, "image_tokens": 0}


def normalize_images_response(body: dict[str, Any]) -> dict[str, Any]:
    """Fill what some upstreams omit: `created`, and `usage.input_tokens_details` (zeros)."""
    if not isinstance(body.get("created"), int):
        body["created"] = int(time.time())
    usage = body.get("usage")
    if isinstance(usage, dict):
        for name in ("input_tokens", "output_tokens", "total_tokens"):
            if not isinstance(usage.get(name), int):
                usage[name] = 0
        if not isinstance(usage.get("input_tokens_details"), dict):
            usage["input_tokens_details"] = dict(_ZERO_INPUT_DETAILS)
        else:
            for name, zero in _ZERO_INPUT_DETAILS.items():
                usage["input_tokens_details"].setdefault(name, zero)
    return body


def spent_nothing(body: dict[str, Any]) -> dict[str, Any]:
    """`body` as a cache hit answers it: its `usage` (and `svg_usage`) in the same shape, every
    count 0, since nothing was spent upstream for it. Clients that add up `usage` then add up
    what was billed. A copy: the cached entry keeps its counts."""
    shown = dict(body)
    for name in ("usage", "svg_usage"):
        if isinstance(body.get(name), dict):
            shown[name] = _zeroed(body[name])
    return shown


def _zeroed(counts: dict[str, Any]) -> dict[str, Any]:
    zeroed: dict[str, Any] = {}
    for name, value in counts.items():
        if isinstance(value, dict):
            zeroed[name] = _zeroed(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            zeroed[name] = 0
        else:
            zeroed[name] = value  # svg_usage.model: a name, not a count
    return zeroed
