"""Pool and routing settings: key ids and caps, named keys, secrets only from the environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.config.settings import load_settings
from app.config.yaml_source import ConfigError
from app.wiring import health_policy
from tests.support.constants import CONFIG
from tests.support.gateway_config import write_routing_config


def test_config_env_keys_still_make_the_default_upstream() -> None:
    settings = load_settings(
        env={
            "GATEWAY_CONFIG": str(CONFIG),
            "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9/v1",
            "GATEWAY_UPSTREAM_KEYS": "sk-first-1111, sk-second-2222",
            "GATEWAY_ALLOW_ANONYMOUS": "true",
        }
    )
    default = settings.upstreams["default"]
    assert default.base_url == "http://127.0.0.1:9/v1"
    assert [spec.id for spec in default.key_specs] == ["default#1", "default#2"]
    assert [k.get_secret_value() for k in default.keys] == ["sk-first-1111", "sk-second-2222"]
    assert settings.admin_keys == ()


def test_config_named_keys_carry_their_caps(tmp_path: Path) -> None:
    upstream = {
        "base_url": "http://127.0.0.1:9/v1",
        "keys_env": "POOL_KEYS",
        "key_limits": {"rpm": 60},
        "named_keys": [{"name": "team-a", "env": "TEAM_A_KEY", "max_concurrency": 2}],
        "priority": 1,
        "weight": 3,
        "max_concurrency": 10,
    }
    config = write_routing_config(tmp_path, {"default": upstream}, retry={"max_attempts": 2})
    settings = load_settings(
        env={
            "GATEWAY_CONFIG": str(config),
            "POOL_KEYS": "sk-pooled-1111",
            "TEAM_A_KEY": "sk-team-a-2222",
            "GATEWAY_ADMIN_KEYS": "igw-admin-3333",
            "GATEWAY_ALLOW_ANONYMOUS": "true",
        }
    )
    pooled, named = settings.upstreams["default"].key_specs
    assert (pooled.id, pooled.rpm, pooled.max_concurrency) == ("default#1", 60, None)
    assert (named.id, named.rpm, named.max_concurrency) == ("team-a", None, 2)
    assert named.secret.get_secret_value() == "sk-team-a-2222"
    assert settings.retry.max_attempts == 2
    assert len(settings.admin_keys) == 1


def test_config_refuses_a_missing_named_key(tmp_path: Path) -> None:
    upstream = {"base_url": "http://x/v1", "named_keys": [{"name": "a", "env": "UNSET_KEY"}]}
    config = write_routing_config(tmp_path, {"default": upstream})
    with pytest.raises(ConfigError, match="UNSET_KEY"):
        load_settings(env={"GATEWAY_CONFIG": str(config), "GATEWAY_ALLOW_ANONYMOUS": "true"})


def test_config_refuses_keys_written_in_the_file(tmp_path: Path) -> None:
    upstream = {"base_url": "http://x/v1", "keys": ["sk-in-a-file-1111"]}
    config = write_routing_config(tmp_path, {"default": upstream})
    with pytest.raises(ConfigError, match="keys never go in this file") as caught:
        load_settings(env={"GATEWAY_CONFIG": str(config), "GATEWAY_ALLOW_ANONYMOUS": "true"})
    assert "sk-in-a-file-1111" not in str(caught.value)


def test_config_ejection_share_and_outlier_window_reach_the_pool(tmp_path: Path) -> None:
    upstream = {"base_url": "http://127.0.0.1:9/v1", "keys_env": "POOL_KEYS"}
    pool = {"max_ejected_share": 0.25, "outlier_window": 12}
    config = write_routing_config(tmp_path, {"default": upstream}, pool=pool)
    env = {
        "GATEWAY_CONFIG": str(config),
        "POOL_KEYS": "sk-a-1111",
        "GATEWAY_ALLOW_ANONYMOUS": "true",
    }
    policy = health_policy(load_settings(env=env).pool)
    assert (policy.max_ejected_share, policy.outlier_window) == (0.25, 12.0)
    shipped = load_settings(
        env={
            "GATEWAY_CONFIG": str(CONFIG),
            "GATEWAY_UPSTREAM_KEYS": "sk-a-1111",
            "GATEWAY_ALLOW_ANONYMOUS": "true",
        }
    )
    defaults = health_policy(shipped.pool)
    assert (defaults.max_ejected_share, defaults.outlier_window) == (0.5, 30.0)


@pytest.mark.parametrize(
    "pool", [{"max_ejected_share": 1.5}, {"max_ejected_share": -0.1}, {"outlier_window": 0}]
)
def test_config_refuses_an_ejection_setting_out_of_range(
    tmp_path: Path, pool: dict[str, float]
) -> None:
    upstream = {"base_url": "http://127.0.0.1:9/v1", "keys_env": "POOL_KEYS"}
    config = write_routing_config(tmp_path, {"default": upstream}, pool=pool)
    with pytest.raises(ConfigError, match=next(iter(pool))):
        load_settings(
            env={
                "GATEWAY_CONFIG": str(config),
                "POOL_KEYS": "sk-a-1111",
                "GATEWAY_ALLOW_ANONYMOUS": "true",
            }
        )
