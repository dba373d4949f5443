"""A cache hit's ImagesResponse: the original `usage` shape, every count 0, the entry kept."""

from __future__ import annotations

from typing import Any

from openai.types import ImagesResponse

from app.upstream.images_response import spent_nothing


def test_spent_nothing_zeroes_every_count_in_the_same_shape() -> None:
    original: dict[str, Any] = {
        "created": 1,
        "data": [{"b64_json": "AAAA"}],
        "usage": {
            "input_tokens": 50,
            "output_tokens": 100,
            "total_tokens": 150,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 40, "cached_tokens": 5},
            "output_tokens_details": {"text_tokens": 0, "image_tokens": 100},
        },
        "svg_usage": {
            "input_tokens": 3,
            "model": "gpt-5",
            "output_tokens": 4,
            "reasoning_tokens": 2,
            "total_tokens": 7,
        },
    }
    shown = spent_nothing(original)
    assert shown["usage"] == {
        "input_tokens": 0,
        "output_tokens": 0,
        "total_tokens": 0,
        "input_tokens_details": {"text_tokens": 0, "image_tokens": 0, "cached_tokens": 0},
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 0},
    }
    assert shown["svg_usage"]["model"] == "gpt-5" and shown["svg_usage"]["total_tokens"] == 0
    assert shown["data"] == original["data"]
    # The cached entry keeps what the call really used.
    assert original["usage"]["input_tokens_details"]["image_tokens"] == 40
    # The SDK parses it.
    parsed = ImagesResponse.model_validate(shown)
    assert parsed.usage is not None and parsed.usage.total_tokens == 0


def test_spent_nothing_leaves_an_answer_without_usage_alone() -> None:
    assert spent_nothing({"created": 1, "data": []}) == {"created": 1, "data": []}
