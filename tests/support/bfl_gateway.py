"""Gateways with a `bfl` upstream for tests: a tmp gateway.yaml and a tmp copy of the catalog
pointing the Flux models (Kontext and FLUX.2) at the fake BFL server."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from openai import OpenAI

from app.config.settings import Settings, load_settings
from app.main import create_app
from tests.support import yaml_files
from tests.support.constants import CLIENT_KEY, MODELS
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

BFL_KEYS = ("bfl-test-key-AAAA1111aaaa", "bfl-test-key-BBBB2222bbbb")
OPENAI_KEYS = ("sk-test-upstream-CCCC3333cccc",)
# The catalog's models with `bfl` rules; write_bfl_config points them all at the bfl upstream.
FLUX_MODELS = (
    "flux-kontext-pro",
    "flux-kontext-max",
    "flux-2-pro",
    "flux-2-max",
    "flux-2-flex",
    "flux-2-klein-4b",
    "flux-2-klein-9b",
)

# Loopback and plain http are allowed explicitly: the fake runs on 127.0.0.1 without TLS.
TEST_BFL = {
    "poll_interval": 0.01,
    "poll_deadline": 20,
    "request_timeout": 5,
    "allowed_hosts": ["127.0.0.1"],
    "allow_http": True,
    "allow_private_addresses": True,
    "max_result_bytes": 64 * 1024,
}


def write_bfl_config(
    directory: Path,
    *,
    bfl_url: str,
    openai_url: str = "http://127.0.0.1:9/v1",
    flux_upstreams: tuple[str, ...] = ("bfl",),
    bfl: dict[str, Any] | None = None,
    timeouts: dict[str, float] | None = None,
    priorities: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    catalog = yaml_files.load(MODELS.read_text())
    for name in FLUX_MODELS:
        catalog["models"][name]["upstreams"] = list(flux_upstreams)
    (directory / "models.yaml").write_text(yaml_files.dump(catalog))
    upstream: dict[str, Any] = {
        "type": "bfl",
        "base_url": bfl_url + "/v1",
        "keys_env": "GATEWAY_BFL_KEYS",
        # The fake's own port, where its polling and result URLs point.
        "bfl": {**TEST_BFL, **_ports_of(bfl_url), **(bfl or {})},
    }
    if timeouts:
        upstream["timeouts"] = timeouts
    config = {
        "catalog": "models.yaml",
        "default_model": "flux-kontext-pro",
        "upstreams": {
            "default": {
                "type": "openai",
                "base_url": openai_url,
                "keys_env": "GATEWAY_UPSTREAM_KEYS",
            },
            "bfl": upstream,
        },
    }
    config.update(extra or {})
    for name, priority in (priorities or {}).items():
        config["upstreams"][name]["priority"] = priority
    path = directory / "gateway.yaml"
    path.write_text(yaml_files.dump(config))
    return path


def _ports_of(url: str) -> dict[str, list[int]]:
    port = urlsplit(url).port
    return {"allowed_ports": [port]} if port else {}


def bfl_settings(config_path: Path) -> Settings:
    return load_settings(
        env={
            "GATEWAY_CONFIG": str(config_path),
            "GATEWAY_UPSTREAM_KEYS": ",".join(OPENAI_KEYS),
            "GATEWAY_BFL_KEYS": ",".join(BFL_KEYS),
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        }
    )


@contextmanager
def serve_bfl_gateway(directory: Path, **config: Any) -> Iterator[str]:
    """A gateway on a real port with a `bfl` upstream; yields its base URL."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = bfl_settings(write_bfl_config(directory, **config))
    with serve_in_thread(create_app(settings)) as url:
        yield url


def sdk(gateway_url: str, *, max_retries: int = 0) -> OpenAI:
    # Longer than sdk_client's default: a BFL edit is a submit and then polls.
    return sdk_client(gateway_url, max_retries=max_retries, timeout=60)
