"""Gateways with `azure` and `gemini` upstreams for tests: a tmp gateway.yaml, and a tmp copy of the
repo's catalog whose Gemini rows are served by the gemini upstream and whose GPT image rows use the
shipped Azure rule set (`x-azure-gpt-image-model`) on the azure upstream."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.config.settings import Settings, load_settings
from app.main import create_app
from tests.support import yaml_files
from tests.support.constants import CLIENT_KEY, MODELS
from tests.support.servers import serve_in_thread

AZURE_KEYS = ("azure-test-key-AAAA1111aaaa0000", "azure-test-key-BBBB2222bbbb0000")
GEMINI_KEYS = ("AIzaTestGeminiKeyAAAA1111aaaa", "AIzaTestGeminiKeyBBBB2222bbbb")
OPENAI_KEYS = ("sk-test-upstream-DDDD4444dddd",)
# Public model -> the Azure deployment the test config names for it; gpt-image-1-mini has no
# entry, so its deployment is its upstream_model.
AZURE_MODEL = "gpt-image-1.5"
AZURE_DEPLOYMENT = "images-prod-eastus"
AZURE_UNMAPPED_MODEL = "gpt-image-1-mini"
GEMINI_MODELS = ("gemini-2.5-flash-image", "gemini-3-pro-image-preview")


def write_provider_config(
    directory: Path,
    *,
    azure_url: str,
    gemini_url: str,
    azure: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
) -> Path:
    catalog = yaml_files.load(MODELS.read_text())
    for name in GEMINI_MODELS:
        catalog["models"][name]["upstreams"] = ["gemini"]
    for name in (AZURE_MODEL, AZURE_UNMAPPED_MODEL):
        catalog["models"][name] = {**catalog["x-azure-gpt-image-model"], "upstreams": ["azure"]}
    (directory / "models.yaml").write_text(yaml_files.dump(catalog))
    config: dict[str, Any] = {
        "catalog": "models.yaml",
        "default_model": AZURE_MODEL,
        "upstreams": {
            "default": {
                "type": "openai",
                "base_url": "http://127.0.0.1:9/v1",
                "keys_env": "GATEWAY_UPSTREAM_KEYS",
            },
            "azure": {
                "type": "azure",
                "base_url": azure_url,
                "keys_env": "GATEWAY_AZURE_KEYS",
                "azure": {"deployments": {AZURE_MODEL: AZURE_DEPLOYMENT}, **(azure or {})},
            },
            "gemini": {
                "type": "gemini",
                "base_url": gemini_url,
                "keys_env": "GATEWAY_GEMINI_KEYS",
            },
        },
        # Repeated identical edits must reach the fakes: these tests count upstream calls.
        "cache": {"enabled": False},
        "pool": {"namespace": "t-" + uuid.uuid4().hex[:12]},
        "retry": retry or {},
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml_files.dump(config))
    return path


def provider_settings(config_path: Path) -> Settings:
    return load_settings(
        env={
            "GATEWAY_CONFIG": str(config_path),
            "GATEWAY_UPSTREAM_KEYS": ",".join(OPENAI_KEYS),
            "GATEWAY_AZURE_KEYS": ",".join(AZURE_KEYS),
            "GATEWAY_GEMINI_KEYS": ",".join(GEMINI_KEYS),
            "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        }
    )


@contextmanager
def serve_provider_gateway(directory: Path, **config: Any) -> Iterator[str]:
    """A gateway on a real port in front of the azure and gemini fakes; yields its base URL."""
    directory.mkdir(parents=True, exist_ok=True)
    settings = provider_settings(write_provider_config(directory, **config))
    with serve_in_thread(create_app(settings)) as url:
        yield url
