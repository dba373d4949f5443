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
