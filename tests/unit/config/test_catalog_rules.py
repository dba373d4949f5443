"""Unit: cross-field rules are catalog data (`requires`, `excludes`, `when`), checked when the
catalog loads, and the shipped catalog carries OpenAI's GPT image rules as such data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from app.config.catalog import load_catalog
from app.config.yaml_source import ConfigError
from tests.support.constants import MODELS


def write(tmp_path: Path, params: dict[str, Any], **model: Any) -> Path:
    path = tmp_path / "models.yaml"
    body = {"upstreams": ["default"], "params": params, **model}
    path.write_text(yaml.safe_dump({"models": {"m": body}}))
    return path


FORMAT = {"kind": "enum", "values": ["png", "gif"], "default": "png"}


@pytest.mark.parametrize(
    ("params", "model", "message"),
    [
        (
            {"frame_count": {"kind": "int", "requires": {"output_fromat": ["gif"]}}},
            {},
            "requires.output_fromat",
        ),
        (
            {"output_format": {**FORMAT, "when": {"gif": {"excludes": ["streem"]}}}},
            {},
            "'streem' is not a field",
        ),
        (
            {"output_format": {**FORMAT, "when": {"svg": {"excludes": []}}}},
            {},
            "when.svg",
        ),
        ({}, {"markup": {"allowed": True, "excludes": ["maks"]}}, "'maks'"),
    ],
)
def test_a_rule_naming_what_the_model_lacks_is_refused_at_load(
    tmp_path: Path, params: dict[str, Any], model: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_catalog(write(tmp_path, params, **model), known_upstreams={"default"})


def test_rule_values_are_compared_as_text() -> None:
    catalog = load_catalog(MODELS, known_upstreams={"default"})
    svg = catalog.models["gpt-image-2.6-flare"].params["output_format"].when["svg"]
    assert svg.requires == {"n": ("1",)}  # YAML's `[1]`


def test_shipped_catalog_carries_the_gpt_image_rules_as_data() -> None:
    models = load_catalog(MODELS, known_upstreams={"default"}).models
    for name in ("gpt-image-2.6-flare", "gpt-image-2.6-sunburst"):
        params = models[name].params
        assert set(params["output_format"].values) >= {"gif", "svg"}
        assert params["frame_count"].requires == {"output_format": ("gif",)}
        assert (params["frame_count"].min, params["frame_count"].max) == (2, 16)
        assert params["frame_count"].default == 9
        assert params["frame_duration_ms"].min == 20
        assert params["frame_duration_ms"].default == 200
        assert set(params["output_format"].when["gif"].excludes) == {
            "stream",
            "partial_images",
            "mask",
            "output_compression",
        }
        assert params["complexity"].values == ("low", "medium", "high")
        assert models[name].markup.allowed and models[name].markup.excludes == ("mask",)
    # complexity, GIF and SVG are 2.6's alone.
    for name, model in models.items():
        if not name.startswith("gpt-image-2.6"):
            assert "complexity" not in model.params, name
            output_format = model.params.get("output_format")
            assert output_format is None or "gif" not in output_format.values, name
    assert models["gpt-image-1.5"].params["input_fidelity"].values == ("high", "low")
    assert models["gpt-image-1-mini"].params["input_fidelity"].values == ("low",)
    for name in models:
        if name.startswith("gpt-image-2") or name == "chatgpt-image-latest":
            assert "input_fidelity" not in models[name].params, name
            custom = models[name].params["size"].custom
            assert custom is not None and custom.min_pixels == 655_360, name
            assert custom.max_pixels == 8_294_400, name
