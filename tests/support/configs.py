"""Write gateway configs for tests that need other settings than config/gateway.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "config" / "models.yaml"


def write_gateway_config(directory: Path, **overrides: Any) -> Path:
    """A gateway.yaml in `directory` using the repo's catalog, with top-level keys overridden."""
    base = yaml.safe_load((REPO / "config" / "gateway.yaml").read_text())
    base["catalog"] = str(MODELS)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    path = directory / "gateway.yaml"
    path.write_text(yaml.safe_dump(base))
    return path
