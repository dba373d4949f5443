"""A `bfl` upstream in config: safe defaults; each model's `bfl` rules parsed from the catalog;
catalog rules BFL cannot honour fail at startup."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config.catalog import load_catalog
from app.config.yaml_source import ConfigError
from tests.support import yaml_files
from tests.support.bfl_gateway import bfl_settings, write_bfl_config
from tests.support.constants import MODELS


def test_bfl_config_defaults_are_production_safe(tmp_path: Path) -> None:
    path = write_bfl_config(tmp_path, bfl_url="https://api.bfl.ai")
    config = yaml_files.load(path.read_text())
    del config["upstreams"]["bfl"]["bfl"]  # nothing set: the defaults apply
    path.write_text(yaml_files.dump(config))
    bfl = bfl_settings(path).upstreams["bfl"]
    assert bfl.type == "bfl"
    assert bfl.bfl.allowed_hosts == ("*.bfl.ai",)
    assert not bfl.bfl.allow_http and not bfl.bfl.allow_private_addresses
    assert bfl.bfl.allowed_ports == (80, 443)
    assert [key.get_secret_value() for key in bfl.keys]  # from GATEWAY_BFL_KEYS


@pytest.mark.parametrize(
    ("rule", "value", "message"),
    [
        ("mask", {"allowed": True}, r"flux-kontext-pro\.mask\.allowed"),
        ("images", {"max_count": 8}, r"flux-kontext-pro\.images\.max_count"),
    ],
)
def test_bfl_config_refuses_model_rules_bfl_cannot_honour(
    tmp_path: Path, rule: str, value: dict[str, object], message: str
) -> None:
    path = write_bfl_config(tmp_path, bfl_url="https://api.bfl.ai")
    models = yaml_files.load((tmp_path / "models.yaml").read_text())
    models["models"]["flux-kontext-pro"][rule] = value
    (tmp_path / "models.yaml").write_text(yaml_files.dump(models))
    with pytest.raises(ConfigError, match=message):
        bfl_settings(path)


def test_bfl_catalog_ships_flux2_as_rows() -> None:
    catalog = load_catalog(MODELS, known_upstreams={"default"})
    for name in ("flux-2-pro", "flux-2-max", "flux-2-flex"):
        model = catalog.models[name]
        assert model.bfl is not None and model.bfl.max_images == 8 == model.images.max_count
        assert model.bfl.size.mode == "width_height"
        assert (model.bfl.size.multiple_of, model.bfl.size.max_pixels) == (16, 4 * 1024 * 1024)
        assert model.bfl.endpoint is None and model.upstream_model == name  # /v1/<name>
        assert not model.mask.allowed
    for name in ("flux-2-klein-4b", "flux-2-klein-9b"):
        rules = catalog.models[name].bfl
        assert rules is not None and rules.max_images == 4 == catalog.models[name].images.max_count
    flex = catalog.models["flux-2-flex"]
    assert flex.bfl is not None and {"steps", "guidance"} <= set(flex.bfl.fields)
    assert (flex.params["steps"].min, flex.params["steps"].max) == (1, 50)
    assert (flex.params["guidance"].kind, flex.params["guidance"].min) == ("number", 1.5)
    assert flex.params["guidance"].max == 10
    pro = catalog.models["flux-2-pro"]
    assert pro.bfl is not None and "steps" not in pro.bfl.fields and "steps" not in pro.params
    kontext = catalog.models["flux-kontext-pro"].bfl
    assert kontext is not None and (kontext.max_images, kontext.size.mode) == (4, "aspect_ratio")


def test_bfl_catalog_a_new_model_is_a_config_edit(tmp_path: Path) -> None:
    path = write_bfl_config(tmp_path, bfl_url="https://api.bfl.ai")
    models = yaml_files.load((tmp_path / "models.yaml").read_text())
    future = dict(models["models"]["flux-2-pro"])
    future["upstreams"] = ["bfl"]
    future["images"] = {**future["images"], "max_count": 10}
    future["bfl"] = {**future["bfl"], "endpoint": "flux-3-pro-preview", "max_images": 10}
    models["models"]["flux-3-pro"] = future
    (tmp_path / "models.yaml").write_text(yaml_files.dump(models))
    rules = bfl_settings(path).catalog.models["flux-3-pro"].bfl
    assert rules is not None and (rules.endpoint, rules.max_images) == ("flux-3-pro-preview", 10)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"endpoint": "https://evil.example/v1"}, r"flux-2-pro\.bfl: .*endpoint"),
        ({"fields": ["seed", "size"]}, r"flux-2-pro\.bfl: .*fields: size"),
        ({"fields": ["seed", "steps"]}, r"bfl\.fields: steps is not in params"),
        ({"max_images": -1}, r"flux-2-pro\.bfl\.max_images"),
        ({"size": {"mode": "pixels"}}, r"flux-2-pro\.bfl\.size\.mode"),
        (
            {"size": {"mode": "width_height", "ratio_pixels": 5000000}},
            r"flux-2-pro\.bfl\.size",
        ),
    ],
)
def test_bfl_catalog_refuses_malformed_bfl_rules(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    models = yaml_files.load(MODELS.read_text())
    models["models"]["flux-2-pro"]["bfl"] = {**models["models"]["flux-2-pro"]["bfl"], **change}
    (tmp_path / "models.yaml").write_text(yaml_files.dump(models))
    with pytest.raises(ConfigError, match=message):
        load_catalog(tmp_path / "models.yaml", known_upstreams={"default"})


@pytest.mark.parametrize(
    ("model", "change", "message"),
    [
        ("flux-2-pro", {"bfl": None}, r"flux-2-pro\.bfl: needed for the bfl upstream"),
        ("flux-2-klein-4b", {"images": {"max_count": 5}}, r"klein-4b\.images\.max_count"),
        (
            "flux-2-pro",
            {"size": {"kind": "size", "values": ["auto", "1000x1000"]}},
            r"flux-2-pro\.params\.size: '1000x1000' is outside bfl\.size",
        ),
        (
            "flux-2-pro",
            {
                "size": {
                    "kind": "size",
                    "values": ["auto"],
                    "custom": {"multiple_of": 8, "max_pixels": 4194304},
                }
            },
            r"flux-2-pro\.params\.size\.custom",
        ),
        ("flux-kontext-pro", {"translate": {}}, r"flux-kontext-pro\.translate\.size"),
    ],
)
def test_bfl_catalog_refuses_rows_the_bfl_upstream_cannot_send(
    tmp_path: Path, model: str, change: dict[str, object], message: str
) -> None:
    path = write_bfl_config(tmp_path, bfl_url="https://api.bfl.ai")
    models = yaml_files.load((tmp_path / "models.yaml").read_text())
    row = models["models"][model]
    if "size" in change:  # a change to one param; the others stay
        row["params"] = {**row["params"], **change}
    else:
        row = {name: value for name, value in {**row, **change}.items() if value is not None}
    models["models"][model] = row
    (tmp_path / "models.yaml").write_text(yaml_files.dump(models))
    with pytest.raises(ConfigError, match=message):
        bfl_settings(path)
