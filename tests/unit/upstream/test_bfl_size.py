"""OpenAI's size and the reseller's aspect_ratio mapped onto a BFL model's size mode."""

from __future__ import annotations

import math

import pytest

from app.config.catalog import BflSize
from app.errors import InvalidRequest
from app.upstream.bfl_size import RATIO_TOLERANCE, ratio_dimensions, size_fields

FLUX2 = BflSize(mode="width_height")  # multiples of 16, at least 64, at most 4 MP, ~1 MP ratios
KONTEXT = BflSize(mode="aspect_ratio")
RATIOS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21")


@pytest.mark.parametrize(
    ("ratio", "dimensions"),
    [
        ("1:1", (1024, 1024)),
        ("16:9", (1360, 768)),
        ("9:16", (768, 1360)),
        ("3:2", (1248, 832)),
        ("2:3", (832, 1248)),
        ("4:3", (1184, 880)),
        ("21:9", (1536, 656)),
    ],
)
def test_bfl_size_aspect_ratio_becomes_the_largest_dimensions_at_1_mp(
    ratio: str, dimensions: tuple[int, int]
) -> None:
    assert ratio_dimensions(FLUX2, ratio) == dimensions


@pytest.mark.parametrize("ratio", RATIOS)
def test_bfl_size_aspect_ratio_dimensions_keep_the_rules(ratio: str) -> None:
    width, height = ratio_dimensions(FLUX2, ratio)
    wide, tall = (int(part) for part in ratio.split(":"))
    assert width % 16 == 0 and height % 16 == 0
    assert min(width, height) >= 64 and width * height <= 1024 * 1024
    assert abs(math.log(width / height / (wide / tall))) <= math.log(RATIO_TOLERANCE)
    # The same rule both ways round.
    assert ratio_dimensions(FLUX2, f"{tall}:{wide}") == (height, width)
    # No larger pair of multiples of 16 within the budget keeps the ratio as closely.
    assert width * height > (1024 * 1024) * 0.9


def test_bfl_size_aspect_ratio_follows_the_models_own_bounds() -> None:
    coarse = BflSize(mode="width_height", multiple_of=32, ratio_pixels=2 * 1024 * 1024)
    width, height = ratio_dimensions(coarse, "16:9")
    assert width % 32 == 0 and height % 32 == 0 and width * height <= 2 * 1024 * 1024
    assert width * height > 1024 * 1024 * 1.8


def test_bfl_size_wxh_is_sent_as_width_and_height() -> None:
    assert size_fields(FLUX2, "1536x1024", None) == {"width": 1536, "height": 1024}
    assert size_fields(FLUX2, "2048x2048", None) == {"width": 2048, "height": 2048}  # 4 MP
    assert size_fields(FLUX2, None, "16:9") == {"width": 1360, "height": 768}
    assert size_fields(FLUX2, "auto", "2:3") == {"width": 832, "height": 1248}


def test_bfl_size_auto_or_nothing_keeps_the_input_size() -> None:
    assert size_fields(FLUX2, "auto", None) == {}
    assert size_fields(FLUX2, None, None) == {}


@pytest.mark.parametrize("size", ["1000x1000", "2064x2048", "48x1024", "1024", "0x0"])
def test_bfl_size_outside_the_rules_is_a_400_naming_size(size: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        size_fields(FLUX2, size, None)
    assert caught.value.param == "size"


def test_bfl_size_and_aspect_ratio_together_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as caught:
        size_fields(FLUX2, "1024x1024", "16:9")
    assert (caught.value.param, caught.value.code) == ("aspect_ratio", "conflicting_parameters")


@pytest.mark.parametrize("ratio", ["16-9", "0:1", "wide"])
def test_bfl_size_unreadable_aspect_ratio_is_a_400(ratio: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        size_fields(FLUX2, None, ratio)
    assert caught.value.param == "aspect_ratio"


def test_bfl_size_kontext_sends_aspect_ratio_as_it_is() -> None:
    assert size_fields(KONTEXT, None, "21:9") == {"aspect_ratio": "21:9"}
    assert size_fields(KONTEXT, None, None) == {}
