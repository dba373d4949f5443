"""Write a gateway.yaml (and, for routing tests, a one-model catalog) for tests that need other
settings than config/gateway.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support import yaml_files
from tests.support.constants import CONFIG, MODELS

MODEL = "gpt-image-1.5"


def write_gateway_config(directory: Path, **sections: Any) -> Path:
    """A gateway.yaml in `directory`: config/gateway.yaml (the code's defaults, spelled out) with
    the repo's catalog and top-level sections overridden. A mapping is merged key by key into the
    repo's section, except `upstreams`, which replaces them: a test's upstreams are all there is."""
    base = yaml_files.load(CONFIG.read_text())
    base["catalog"] = str(MODELS)
    for key, value in sections.items():
        if key != "upstreams" and isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = directory / "gateway.yaml"
    path.write_text(yaml_files.dump(base))
    return path


def write_routing_config(
    directory: Path,
    upstreams: dict[str, dict[str, Any]],
    *,
    model_upstreams: list[str] | None = None,
    model: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
) -> Path:
    """Upstreams as gateway.yaml spells them, and a catalog of one model served from
    `model_upstreams` (all of them when not given), written beside the gateway.yaml."""
    catalog = {
        "models": {
            MODEL: {
                "upstreams": model_upstreams or list(upstreams),
                "params": {"n": {"kind": "int", "min": 1, "max": 10, "default": 1}},
                **(model or {}),
            }
        }
    }
    models = directory / "models.yaml"
    models.write_text(yaml_files.dump(catalog))
    return write_gateway_config(
        directory,
        catalog=str(models),
        default_model=MODEL,
        upstreams=upstreams,
        # Quick probes and no waiting on gateway internals keep the tests short.
        pool={"probe_interval": 0.2, **(pool or {})},
        retry=retry or {},
        # Repeated identical edits must reach the upstream: these tests count upstream calls.
        cache={"enabled": False},
    )
