"""A `bfl` upstream in config: safe defaults; catalog rules BFL cannot honour fail at startup."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from app.config.yaml_source import ConfigError
from tests.support.bfl_gateway import bfl_settings, write_bfl_config


def test_bfl_config_defaults_are_production_safe(tmp_path: Path) -> None:
    path = write_bfl_config(tmp_path, bfl_url="https://api.bfl.ai")
    config = yaml.safe_load(path.read_text())
    del config["upstreams"]["bfl"]["bfl"]  # nothing set: the defaults apply
    path.write_text(yaml.safe_dump(config))
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
    models = yaml.safe_load((tmp_path / "models.yaml").read_text())
    models["models"]["flux-kontext-pro"][rule] = value
    (tmp_path / "models.yaml").write_text(yaml.safe_dump(models))
    with pytest.raises(ConfigError, match=message):
        bfl_settings(path)
