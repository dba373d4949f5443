"""Unit: validation applies whatever cross-field rules the catalog holds, for any model, and
names the field at fault; a markup is checked like a mask."""

from __future__ import annotations

from typing import Any

import pytest

from app.config.catalog import Catalog
from app.errors import InvalidRequest
from app.intake.form import IntakeForm, TextField
from app.intake.validation import validate_edit
from tests.support import images
from tests.unit.cache.builders import upload

# A made-up model: no code knows its name, only these rules.
RULES: dict[str, Any] = {
    "upstreams": ["default"],
    "markup": {"allowed": True, "excludes": ["mask"]},
    "params": {
        "n": {"kind": "int", "min": 1, "max": 4, "default": 1},
        "output_format": {
            "kind": "enum",
            "values": ["png", "gif"],
            "default": "png",
            "when": {"gif": {"excludes": ["stream", "mask"], "requires": {"n": [1]}}},
        },
        "frame_count": {
            "kind": "int",
            "min": 2,
            "max": 8,
            "requires": {"output_format": ["gif"]},
        },
        "stream": {"kind": "bool", "default": False},
    },
}


def catalog() -> Catalog:
    return Catalog.model_validate(
        {"models": {"toy": {"name": "toy", "upstream_model": "toy", **RULES}}}
    )


def validate(fields: dict[str, str], files: list[tuple[str, bytes]] | None = None) -> None:
    form = IntakeForm(
        fields=[TextField("prompt", "x"), *(TextField(k, v) for k, v in fields.items())],
        files=[upload(name, data) for name, data in [("image", images.png()), *(files or [])]],
    )
    validate_edit(form, catalog(), default_model="toy", max_pixels=10**8)


@pytest.mark.parametrize(
    ("fields", "files", "param"),
    [
        ({"frame_count": "4"}, [], "frame_count"),  # requires gif; the default is png
        ({"output_format": "png", "frame_count": "4"}, [], "frame_count"),
        ({"output_format": "gif", "n": "2"}, [], "output_format"),
        ({"output_format": "gif", "stream": "true"}, [], "stream"),
        ({"output_format": "gif"}, [("mask", images.mask_png())], "mask"),
        ({}, [("markup", images.markup_png()), ("mask", images.mask_png())], "mask"),
        ({}, [("markup", images.markup_png(32, 32))], "markup"),
        ({}, [("markup", images.png())], "markup"),  # no alpha
        ({}, [("markup", images.jpeg(64, 64))], "markup"),
        ({}, [("markup", images.markup_png()), ("markup", images.markup_png())], "markup"),
    ],
)
def test_each_rule_names_the_field_at_fault(
    fields: dict[str, str], files: list[tuple[str, bytes]], param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(fields, files)
    assert caught.value.status_code == 400
    assert caught.value.param == param


def test_what_the_rules_allow_passes() -> None:
    validate({"output_format": "gif", "frame_count": "4", "stream": "false"})
    validate({"output_format": "png", "n": "3"}, [("mask", images.mask_png())])
    validate({}, [("markup", images.markup_png())])


def test_a_model_without_markup_refuses_one() -> None:
    no_markup = {**RULES, "markup": {"allowed": False}}
    toy = Catalog.model_validate(
        {"models": {"toy": {"name": "toy", "upstream_model": "toy", **no_markup}}}
    )
    form = IntakeForm(
        fields=[TextField("prompt", "x")],
        files=[upload("image", images.png()), upload("markup", images.markup_png())],
    )
    with pytest.raises(InvalidRequest) as caught:
        validate_edit(form, toy, default_model="toy", max_pixels=10**8)
    assert (caught.value.param, caught.value.code) == ("markup", "unsupported_parameter")
