"""Write a gateway.yaml and models.yaml for one test: several upstreams, one small catalog."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

MODEL = "gpt-image-1.5"


def write_gateway_config(
    directory: Path,
    upstreams: dict[str, dict[str, Any]],
    *,
    model_upstreams: list[str] | None = None,
    model: dict[str, Any] | None = None,
    pool: dict[str, Any] | None = None,
    retry: dict[str, Any] | None = None,
) -> Path:
    """Upstreams as gateway.yaml spells them; the one model serves from `model_upstreams`."""
    catalog = {
        "models": {
            MODEL: {
                "upstreams": model_upstreams or list(upstreams),
                "params": {"n": {"kind": "int", "min": 1, "max": 10, "default": 1}},
                **(model or {}),
            }
        }
    }
    (directory / "models.yaml").write_text(yaml.safe_dump(catalog))
    config: dict[str, Any] = {
        "catalog": "models.yaml",
        "default_model": MODEL,
        "upstreams": upstreams,
        # Quick probes and no waiting on gateway internals keep the tests short.
        "pool": {"probe_interval": 0.2, **(pool or {})},
        "retry": retry or {},
        # Repeated identical edits must reach the upstream: these tests count upstream calls.
        "cache": {"enabled": False},
    }
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
