"""YAML for the configs tests write, read and dump with libyaml where PyYAML has it, as the
gateway reads its own (app/config/yaml_source.py): tests copy the 18 KB catalog hundreds of
times, and PyYAML's pure-Python parser and emitter take ~25 and ~16 ms for it (libyaml: ~3)."""

from __future__ import annotations

from typing import Any

import yaml

from app.config.yaml_source import FAST_SAFE_LOADER

_FAST_SAFE_DUMPER: type[yaml.SafeDumper] | type[yaml.CSafeDumper] = getattr(
    yaml, "CSafeDumper", yaml.SafeDumper
)


def load(text: str) -> Any:
    """yaml.safe_load, faster."""
    return yaml.load(text, Loader=FAST_SAFE_LOADER)


def dump(data: Any) -> str:
    """yaml.safe_dump, faster."""
    return yaml.dump(data, Dumper=_FAST_SAFE_DUMPER)
