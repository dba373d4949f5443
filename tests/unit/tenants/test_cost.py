"""Unit: the one cost estimate, priced by kind of token (text, image, cached) from an answer's
`usage`, with rates a catalog leaves out falling back to the uncached/text ones."""

from __future__ import annotations

from decimal import Decimal

from app.config.catalog import ModelPrice
from app.tenants.usage import TokenUsage, estimate_cost_nanos, tokens_of

# GPT Image 2.6's published rates (USD per 1M tokens).
GPT_IMAGE_26 = ModelPrice(
    per_million_input_tokens=Decimal(5),
    per_million_cached_input_tokens=Decimal("1.25"),
    per_million_image_input_tokens=Decimal(8),
    per_million_cached_image_input_tokens=Decimal(2),
    per_million_output_tokens=Decimal(30),
)


def usage(**fields: object) -> dict[str, object]:
    return {"usage": fields}


def test_tokens_of_reads_the_input_split_and_cached_share() -> None:
    body = usage(
        input_tokens=1000,
        output_tokens=4000,
        total_tokens=5000,
        input_tokens_details={"text_tokens": 200, "image_tokens": 800, "cached_tokens": 500},
    )
    assert tokens_of(body) == TokenUsage(
        input_tokens=1000,
        output_tokens=4000,
        total_tokens=5000,
        text_input_tokens=200,
        image_input_tokens=800,
        cached_input_tokens=500,
    )


def test_tokens_of_counts_input_without_details_as_text() -> None:
    for details in (None, {"text_tokens": 0, "image_tokens": 0}):  # zeros: filled by the gateway
        body = usage(input_tokens=50, output_tokens=100, total_tokens=150)
        if details is not None:
            body["usage"]["input_tokens_details"] = details  # type: ignore[index]
        tokens = tokens_of(body)
        assert (tokens.text_input_tokens, tokens.image_input_tokens) == (50, 0)


def test_tokens_of_ignores_nonsense() -> None:
    assert tokens_of({}) == TokenUsage()
    assert tokens_of({"usage": "lots"}) == TokenUsage()
    body = usage(
        input_tokens=True,
        output_tokens=-3,
        input_tokens_details={"image_tokens": 10**9, "cached_tokens": 10**9},
    )
    assert tokens_of(body) == TokenUsage()
    clamped = tokens_of(
        usage(input_tokens=10, input_tokens_details={"image_tokens": 99, "cached_tokens": 99})
    )
    assert (clamped.image_input_tokens, clamped.text_input_tokens) == (10, 0)
    assert clamped.cached_input_tokens == 10


def test_cost_prices_each_kind_at_its_rate_and_cached_images_first() -> None:
    tokens = TokenUsage(
        input_tokens=1_000_000,
        output_tokens=1_000_000,
        text_input_tokens=200_000,
        image_input_tokens=800_000,
        cached_input_tokens=900_000,  # all 800k image tokens, then 100k of the text
    )
    expected = (
        Decimal(2) * Decimal("0.8")  # cached image
        + Decimal("1.25") * Decimal("0.1")  # cached text
        + Decimal(5) * Decimal("0.1")  # uncached text
        + Decimal(30)  # output
    )
    assert estimate_cost_nanos(GPT_IMAGE_26, 0, tokens) == int(expected * 10**9)


def test_cost_without_cache_or_split_is_text_rate_plus_output() -> None:
    tokens = tokens_of(usage(input_tokens=50, output_tokens=100, total_tokens=150))
    # $5 x 50/1M + $30 x 100/1M
    assert estimate_cost_nanos(GPT_IMAGE_26, 0, tokens) == 250 * 1000 + 3000 * 1000


def test_rates_left_out_fall_back_to_the_uncached_and_text_ones() -> None:
    single = ModelPrice(
        per_image=Decimal("0.04"),
        per_million_input_tokens=Decimal(10),
        per_million_output_tokens=Decimal(40),
    )
    split = TokenUsage(
        input_tokens=1_000_000,
        text_input_tokens=400_000,
        image_input_tokens=600_000,
        cached_input_tokens=1_000_000,
    )
    # Every input token at $10, whatever its kind, plus two images at $0.04.
    assert estimate_cost_nanos(single, 2, split) == int(Decimal("10.08") * 10**9)
    images_only = ModelPrice(
        per_million_input_tokens=Decimal(5), per_million_image_input_tokens=Decimal(8)
    )
    cached_image = TokenUsage(image_input_tokens=1_000_000, cached_input_tokens=1_000_000)
    # No cached image rate: the (uncached) image rate.
    assert estimate_cost_nanos(images_only, 0, cached_image) == 8 * 10**9
