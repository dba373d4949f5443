"""Egress proxy settings: an upstream's `proxy:`, image_urls.proxy, and the environment's
HTTPS_PROXY/HTTP_PROXY/NO_PROXY; credentials only from the environment, never echoed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from app.config.settings import load_settings
from app.config.yaml_source import ConfigError
from app.wiring import environment_egress, secrets_of
from tests.support.gateway_config import write_gateway_config

BASE_ENV = {"GATEWAY_UPSTREAM_KEYS": "sk-a,sk-b", "GATEWAY_CLIENT_KEYS": "igw-client"}


def with_proxy(tmp_path: Path, **proxy: Any) -> dict[str, str]:
    upstream = {"type": "openai", "base_url": "https://api.openai.com/v1", **proxy}
    path = write_gateway_config(tmp_path, upstreams={"default": upstream})
    return {**BASE_ENV, "GATEWAY_CONFIG": str(path)}


def test_an_upstream_proxy_takes_its_credentials_from_the_environment(tmp_path: Path) -> None:
    env = with_proxy(tmp_path, proxy="http://proxy.internal:3128", proxy_auth_env="EGRESS_AUTH")
    settings = load_settings(env={**env, "EGRESS_AUTH": "gateway:s3cret-pass"})
    upstream = settings.upstreams["default"]
    assert upstream.proxy == "http://proxy.internal:3128"
    assert upstream.proxy_auth is not None
    assert upstream.proxy_auth.get_secret_value() == "gateway:s3cret-pass"
    # Log redaction knows the password, the pair and its Basic form.
    assert {"s3cret-pass", "gateway:s3cret-pass", "Z2F0ZXdheTpzM2NyZXQtcGFzcw=="} <= set(
        secrets_of(settings)
    )
    assert "s3cret" not in repr(settings)


@pytest.mark.parametrize(
    ("proxy", "message"),
    [
        (
            {"proxy": "https://proxy.internal:3128"},
            "upstreams.default.proxy: only http:// proxies",
        ),
        ({"proxy": "http://proxy.internal:3128/x"}, "upstreams.default.proxy: must be http://"),
        ({"proxy": "http://[oops"}, "upstreams.default.proxy: is not a valid URL"),
        (
            {"proxy": "http://user:hunter22@proxy.internal:3128"},
            "upstreams.default.proxy: credentials never go in this file",
        ),
        ({"proxy_auth": "user:hunter22"}, "upstreams.default.proxy_auth: credentials never go"),
        ({"proxy_auth_env": "EGRESS_AUTH"}, "upstreams.default.proxy_auth_env: set, but"),
    ],
)
def test_a_bad_upstream_proxy_names_file_key_and_problem(
    tmp_path: Path, proxy: dict[str, str], message: str
) -> None:
    env = with_proxy(tmp_path, **proxy)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        load_settings(env={**env, "EGRESS_AUTH": "user:hunter22"})
    assert str(caught.value).startswith(env["GATEWAY_CONFIG"] + ": ")
    assert "hunter22" not in str(caught.value)


def test_named_proxy_credentials_must_be_set(tmp_path: Path) -> None:
    env = with_proxy(tmp_path, proxy="http://proxy.internal:3128", proxy_auth_env="EGRESS_AUTH")
    with pytest.raises(ConfigError, match="environment: EGRESS_AUTH: the credentials of"):
        load_settings(env=env)


def test_image_urls_have_a_proxy_of_their_own(tmp_path: Path) -> None:
    path = write_gateway_config(
        tmp_path,
        image_urls={"proxy": "http://fetch.proxy:3128", "proxy_auth_env": "FETCH_AUTH"},
    )
    settings = load_settings(
        env={**BASE_ENV, "GATEWAY_CONFIG": str(path), "FETCH_AUTH": "f:fetch-secret"}
    )
    assert settings.image_urls.proxy == "http://fetch.proxy:3128"
    assert "fetch-secret" in secrets_of(settings)
    bad = write_gateway_config(tmp_path, image_urls={"proxy": "ftp://fetch.proxy"})
    with pytest.raises(ConfigError, match=r"image_urls\.proxy: only http:// proxies"):
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(bad)})


def test_environment_proxies_are_read_once_and_their_credentials_redacted(
    tmp_path: Path,
) -> None:
    env = with_proxy(tmp_path)
    settings = load_settings(
        env={**env, "HTTPS_PROXY": "http://u:env-secret@proxy:3128", "no_proxy": "internal"}
    )
    egress = environment_egress(settings)
    assert [proxy.url for proxy in egress.proxies] == ["http://proxy:3128"]
    assert "env-secret" in secrets_of(settings)
    assert "env-secret" not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**env, "https_proxy": "socks5://u:env-secret@proxy:1080"})
    assert str(caught.value).startswith("environment: https_proxy: only http:// proxies")
    assert "env-secret" not in str(caught.value)
