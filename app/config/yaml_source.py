"""Reading YAML config files as a settings source, and phrasing their problems as
`file: key: what is wrong`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

Location = tuple[int | str, ...]

# libyaml's parser where PyYAML was built with it: the same safe constructor, several times faster
# (settings are loaded once per gateway, and the test suite builds hundreds of gateways).
FAST_SAFE_LOADER: type[yaml.SafeLoader] | type[yaml.CSafeLoader] = getattr(
    yaml, "CSafeLoader", yaml.SafeLoader
)


class ConfigError(Exception):
    """A config problem, phrased so it can be fixed without reading a stack trace."""


def format_validation_error(
    source: str,
    error: ValidationError,
    *,
    variable_for: Callable[[Location], str | None] | None = None,
) -> str:
    """One line per problem, blamed on `source` (a file), or on the environment variable
    `variable_for` says set the value at fault."""
    lines = []
    for item in error.errors():
        variable = variable_for(item["loc"]) if variable_for is not None else None
        if variable is not None:
            lines.append(f"environment: {variable}: {item['msg']}")
            continue
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        lines.append(f"{source}: {key}: {item['msg']}")
    return "\n".join(lines)


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: file not found (set GATEWAY_CONFIG to the gateway's YAML config)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=FAST_SAFE_LOADER)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_parser_error(text, exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: (top level): expected a mapping")
    return data


def _parser_error(text: str, found: yaml.YAMLError) -> yaml.YAMLError:
    """The pure-Python parser's account of what is wrong with `text` (the file is read again only
    when it is broken): unlike libyaml's, it quotes the offending line with a caret under the line
    and column it names. `found` when only libyaml refuses the text."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as exc:
        return exc
    return found


def find_paths(data: Any, pattern: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    """The key paths in nested mappings `data` that match `pattern` (`*`: any one key)."""
    if not pattern:
        yield ()
        return
    if not isinstance(data, dict):
        return
    head, *rest = pattern
    for key in list(data) if head == "*" else [head] if head in data else []:
        for tail in find_paths(data[key], tuple(rest)):
            yield (str(key), *tail)


class YamlFileSource(PydanticBaseSettingsSource):
    """A YAML file as a settings source below the environment: its path is what the sources
    above gave `path_field` (GATEWAY_CONFIG), else `default`. Keys the file may not hold (secrets
    among them) are refused with the reason `refused` gives; nothing in the message repeats a
    value.

    Not pydantic-settings' YamlConfigSettingsSource: that one reads its file when it is built,
    before the environment has named it, and takes a missing file for an empty one."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        *,
        path_field: str,
        default: Path,
        refused: Mapping[tuple[str, ...], str],
    ) -> None:
        super().__init__(settings_cls)
        self.path_field = path_field
        self.refused = refused
        # Known once the source has been read.
        self.path = default

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: __call__ reads the whole file at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        self.path = Path(self.current_state.get(self.path_field) or self.path)
        data = read_yaml(self.path)
        for pattern, reason in self.refused.items():
            for found in find_paths(data, pattern):
                raise ConfigError(f"{self.path}: {'.'.join(found)}: {reason}")
        return data
