"""Named clients in gateway.yaml: validation at startup, and who a presented key belongs to."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from app.config.settings import load_settings
from app.config.tenants import ClientLimits, ClientsConfig, NamedClient
from app.config.yaml_source import ConfigError
from app.main import create_app
from app.tenants.directory import ClientDirectory
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_env import gateway_env
from tests.support.servers import serve_in_thread

BASE_ENV = {"GATEWAY_UPSTREAM_KEYS": "sk-a"}


def settings_with(tmp_path: Path, clients: dict[str, Any], **env: str) -> Any:
    path = write_gateway_config(tmp_path, clients=clients)
    return load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path), **env})


def test_config_named_clients_read_keys_from_env_and_merge_default_limits(
    tmp_path: Path,
) -> None:
    settings = settings_with(
        tmp_path,
        {
            "default_limits": {"requests_per_minute": 60, "images_per_day": 500},
            "named": {
                "design": {
                    "keys_env": "DESIGN_KEYS",
                    "models": ["flux-kontext-pro"],
                    "limits": {"requests_per_minute": 5, "images_per_day": None},
                }
            },
        },
        DESIGN_KEYS="igw-design-1, igw-design-2",
        GATEWAY_REDIS_URL="redis://127.0.0.1:1/0",
    )
    design = settings.clients.named["design"]
    assert [k.get_secret_value() for k in design.keys] == ["igw-design-1", "igw-design-2"]
    assert "igw-design-1" not in repr(settings)
    limits = design.limits.over(settings.clients.default_limits)
    # Its own rpm, its explicit null (unlimited) images/day, nothing else set.
    assert limits == ClientLimits(requests_per_minute=5)


@pytest.mark.parametrize(
    ("clients", "message"),
    [
        ({"named": {"client-1": {}}}, "reserved"),
        ({"named": {"anonymous": {}}}, "reserved"),
        ({"named": {"Bad Name": {}}}, "client names"),
        ({"named": {"t": {"models": ["no-such-model"]}}}, r"clients\.named\.t\.models"),
        ({"named": {"t": {"key_sha256": ["abc"]}}}, "sha256"),
        ({"named": {"t": {"limits": {"requests_per_minute": -1}}}}, "requests_per_minute"),
        ({"named": {"t": {"limits": {"images_per_day": 5}}}}, "no Redis is configured"),
        ({"default_limits": {"concurrent_requests": 2}}, "no Redis is configured"),
    ],
)
def test_config_bad_client_declarations_are_named(
    tmp_path: Path, clients: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_with(tmp_path, clients, GATEWAY_CLIENT_KEYS="k")


def test_config_named_client_keys_env_must_be_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="environment: TEAM_KEYS: client 'team'"):
        settings_with(tmp_path, {"named": {"team": {"keys_env": "TEAM_KEYS"}}})


def test_config_named_clients_alone_satisfy_the_key_requirement(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, {"named": {"team": {}}})
    assert not settings.allow_anonymous and not settings.client_keys


def test_directory_identifies_env_named_and_digest_keys() -> None:
    digest = hashlib.sha256(b"igw-handed-out").hexdigest()
    clients = ClientsConfig(
        named={
            "design": NamedClient(keys=(SecretStr("igw-design"),)),
            "ops": NamedClient(key_sha256=(digest,), models=("gpt-image-1",)),
        }
    )
    directory = ClientDirectory(clients, env_keys=(SecretStr("igw-a"), SecretStr("igw-b")))

    async def identify(key: str) -> str | None:
        return await directory.identify(key)

    assert asyncio.run(identify("igw-b")) == "client-2"
    assert asyncio.run(identify("igw-design")) == "design"
    assert asyncio.run(identify("igw-handed-out")) == "ops"
    assert asyncio.run(identify("igw-handed-ou")) is None
    assert directory.policy("ops").may_use("gpt-image-1")
    assert not directory.policy("ops").may_use("dall-e-2")
    assert directory.policy("unknown").name == "anonymous"
    assert not directory.knows("anonymous") and directory.knows("client-1")


def test_admin_runtime_keys_and_usage_need_redis(fake_upstream: FakeOpenAIUpstream) -> None:
    env = gateway_env(fake_upstream.url, GATEWAY_ADMIN_KEYS="igw-admin-x")
    headers = {"authorization": "Bearer igw-admin-x"}
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        created = httpx.post(url + "/admin/clients/client-1/keys", headers=headers)
        assert created.status_code == 503
        assert "GATEWAY_REDIS_URL" in created.json()["error"]["message"]
        assert httpx.get(url + "/admin/usage", headers=headers).status_code == 503
        clients = httpx.get(url + "/admin/clients", headers=headers).json()["data"]
        assert [c["name"] for c in clients] == ["anonymous", "client-1"]
