"""Settings load from YAML + env, and a bad config fails with file, key and problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config.settings import load_settings
from app.config.yaml_source import ConfigError
from tests.support.constants import CONFIG
from tests.support.gateway_config import write_gateway_config

BASE_ENV = {
    "GATEWAY_CONFIG": str(CONFIG),
    "GATEWAY_UPSTREAM_KEYS": "sk-a,sk-b",
    "GATEWAY_CLIENT_KEYS": "igw-client",
}


def test_config_env_overrides_yaml() -> None:
    settings = load_settings(env={**BASE_ENV, "GATEWAY_UPSTREAM_URL": "http://up.example/v1"})
    default = settings.upstreams["default"]
    assert default.base_url == "http://up.example/v1"
    assert [k.get_secret_value() for k in default.keys] == ["sk-a", "sk-b"]
    assert [k.get_secret_value() for k in settings.client_keys] == ["igw-client"]
    assert "sk-a" not in repr(settings)  # secrets stay hidden in reprs and logs


def test_config_catalog_has_the_seed_and_current_models() -> None:
    settings = load_settings(env=BASE_ENV)
    for name in (
        "gpt-image-1",
        "gpt-image-1-all",
        "flux-kontext-pro",
        "flux-kontext-max",
        "dall-e-2",
        "gpt-image-1.5",
        "gpt-image-1-mini",
        "gpt-image-2",
        "gpt-image-2.5-flare",
        "gpt-image-2.6-sunburst",
        "chatgpt-image-latest",
    ):
        assert name in settings.catalog.models


def test_config_refuses_to_start_without_client_keys() -> None:
    env = {k: v for k, v in BASE_ENV.items() if k != "GATEWAY_CLIENT_KEYS"}
    with pytest.raises(ConfigError, match="GATEWAY_CLIENT_KEYS"):
        load_settings(env=env)
    assert load_settings(env={**env, "GATEWAY_ALLOW_ANONYMOUS": "true"}).allow_anonymous


def test_config_demo_needs_no_keys() -> None:
    settings = load_settings(env={"GATEWAY_CONFIG": str(CONFIG)}, demo=True)
    assert settings.demo and settings.allow_anonymous


def test_config_missing_upstream_keys_named() -> None:
    env = {k: v for k, v in BASE_ENV.items() if k != "GATEWAY_UPSTREAM_KEYS"}
    with pytest.raises(ConfigError, match="GATEWAY_UPSTREAM_KEYS"):
        load_settings(env=env)


def test_config_bad_value_names_file_and_key(tmp_path: Path) -> None:
    path = write_gateway_config(tmp_path, limits={"max_parts": "lots"})
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})
    assert str(path) in str(caught.value)
    assert "limits.max_parts" in str(caught.value)


def test_config_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = write_gateway_config(tmp_path, limitz={})
    with pytest.raises(ConfigError, match="limitz"):
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})


def test_config_bad_catalog_names_model_and_key(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text(
        "models:\n  m1:\n    upstreams: [default]\n    params:\n      n: {kind: decimal}\n"
    )
    path = write_gateway_config(tmp_path, catalog=str(models), default_model="m1")
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})
    message = str(caught.value)
    assert str(models) in message and "models.m1.params.n.kind" in message


def test_config_catalog_unknown_upstream(tmp_path: Path) -> None:
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  m1:\n    upstreams: [nowhere]\n")
    path = write_gateway_config(tmp_path, catalog=str(models), default_model="m1")
    with pytest.raises(ConfigError, match=r"models\.m1\.upstreams: 'nowhere'"):
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})


def test_config_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(tmp_path / "nope.yaml")})


def test_config_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("limits: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})


def test_config_invalid_yaml_names_the_line_and_column_and_quotes_it(tmp_path: Path) -> None:
    # The file is parsed with libyaml where it is there; a broken one is described by the
    # pure-Python parser, whose message quotes the line with a caret under the fault.
    path = tmp_path / "gateway.yaml"
    path.write_text("limits:\n  max: 1\n bad: 2\n")
    with pytest.raises(ConfigError) as raised:
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})
    assert str(raised.value).startswith(f"{path}: not valid YAML: ")
    assert "line 3, column 2" in str(raised.value)
    assert "     bad: 2\n     ^" in str(raised.value)


def test_config_bad_upstream_url(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"upstreams\.default\.base_url"):
        load_settings(env={**BASE_ENV, "GATEWAY_UPSTREAM_URL": "ftp://x"})


@pytest.mark.parametrize("ports", [[0], [65536], [], ["ssh"]])
def test_config_allowed_ports_are_real_ports(tmp_path: Path, ports: list[object]) -> None:
    path = write_gateway_config(tmp_path, image_urls={"allowed_ports": ports})
    with pytest.raises(ConfigError, match=r"image_urls\.allowed_ports"):
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})


def test_config_allowed_ports_default_to_80_and_443_on_every_fetch_path(tmp_path: Path) -> None:
    path = write_gateway_config(tmp_path, image_urls={"allowed_ports": [443, 8443]})
    settings = load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})
    assert settings.image_urls.allowed_ports == (443, 8443)
    assert settings.cache.fetch.allowed_ports == (80, 443)
    assert load_settings(env=BASE_ENV).image_urls.allowed_ports == (80, 443)
