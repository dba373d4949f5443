"""The environment over gateway.yaml: flat and nested GATEWAY_* names, what each source may set,
problems blamed on the variable or the file at fault, and one module reading the environment."""

from __future__ import annotations

import ast
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from app.config.settings import Settings, load_settings
from app.config.yaml_source import ConfigError
from tests.support.constants import CONFIG, REPO
from tests.support.gateway_config import write_gateway_config

BASE_ENV = {
    "GATEWAY_CONFIG": str(CONFIG),
    "GATEWAY_UPSTREAM_KEYS": "sk-a,sk-b",
    "GATEWAY_CLIENT_KEYS": "igw-client",
}


_READERS = ("environ", "environb", "getenv", "getenvb")


def _reads_of_the_environment(path: Path) -> list[int]:
    """Lines reading os.environ (or os.getenv); `os.environ[name] = value` writes are fine."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            lines += [node.lineno for alias in node.names if alias.name in _READERS]
        if not (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in _READERS
        ):
            continue
        parent = parents.get(node)
        written = (
            isinstance(parent, ast.Subscript)
            and parent.value is node
            and isinstance(parent.ctx, ast.Store)
        )
        if not written:
            lines.append(node.lineno)
    return lines


def test_settings_module_is_the_only_reader_of_the_environment() -> None:
    settings_module = Path(inspect.getsourcefile(Settings) or "")
    assert issubclass(Settings, BaseSettings)
    imports = {
        node.module
        for node in ast.walk(ast.parse(settings_module.read_text()))
        if isinstance(node, ast.ImportFrom)
    }
    assert "pydantic_settings" in imports
    readers = {
        str(path.relative_to(REPO)): lines
        for path in sorted((REPO / "app").rglob("*.py"))
        if path != settings_module and (lines := _reads_of_the_environment(path))
    }
    assert readers == {}
    # The check itself sees a read when there is one.
    assert _reads_of_the_environment(settings_module)


def test_config_flat_names_override_the_file(tmp_path: Path) -> None:
    path = write_gateway_config(
        tmp_path,
        upstreams={"default": {"base_url": "https://file.example/v1"}},
        cache={"enabled": True},
        metrics={"public": False},
        image_urls={"enabled": False},
        pool={"namespace": "from-file"},
        allow_anonymous=True,
    )
    env = {
        **BASE_ENV,
        "GATEWAY_CONFIG": str(path),
        "GATEWAY_UPSTREAM_URL": "http://env.example/v1",
        "GATEWAY_CACHE_ENABLED": "false",
        "GATEWAY_METRICS_PUBLIC": "true",
        "GATEWAY_IMAGE_URLS_ENABLED": "on",
        "GATEWAY_POOL_NAMESPACE": "from-env",
        "GATEWAY_ALLOW_ANONYMOUS": "false",
    }
    settings = load_settings(env=env)
    assert settings.upstreams["default"].base_url == "http://env.example/v1"
    assert not settings.cache.enabled and settings.metrics.public
    assert settings.image_urls.enabled and settings.pool.namespace == "from-env"
    # A plain override now: false from the environment beats true in the file.
    assert not settings.allow_anonymous
    without_keys = {k: v for k, v in env.items() if k != "GATEWAY_CLIENT_KEYS"}
    with pytest.raises(ConfigError, match="GATEWAY_CLIENT_KEYS: no client keys configured"):
        load_settings(env=without_keys)
    # Empty variables are unset (compose passes `${X:-}` through as "").
    blank = load_settings(env={**env, "GATEWAY_UPSTREAM_URL": "", "GATEWAY_CACHE_ENABLED": ""})
    assert blank.upstreams["default"].base_url == "https://file.example/v1"
    assert blank.cache.enabled


def test_config_nested_names_reach_every_key(tmp_path: Path) -> None:
    path = write_gateway_config(tmp_path, limits={"max_in_flight": 100}, retry={"max_attempts": 4})
    settings = load_settings(
        env={
            **BASE_ENV,
            "GATEWAY_CONFIG": str(path),
            "GATEWAY_LIMITS__MAX_IN_FLIGHT": "7",
            "gateway_retry__max_attempts": "2",
            "GATEWAY_CACHE__TTL_SECONDS": "60",
            "GATEWAY_CACHE__FETCH__ALLOWED_HOSTS": json.dumps(["results.example"]),
            "GATEWAY_UPSTREAMS__DEFAULT__TIMEOUTS__TOTAL": "12.5",
            "GATEWAY_DEFAULT_MODEL": "gpt-image-1",
            "GATEWAY_LOGGING__FORMAT": "text",
        }
    )
    assert settings.limits.max_in_flight == 7 and settings.retry.max_attempts == 2
    assert settings.cache.ttl_seconds == 60
    assert settings.cache.fetch.allowed_hosts == ("results.example",)
    assert settings.upstreams["default"].timeouts.total == 12.5
    assert settings.upstreams["default"].base_url == "https://api.openai.com/v1"  # from the file
    assert settings.default_model == "gpt-image-1" and settings.logging.format == "text"


def test_config_one_key_by_two_names_is_refused() -> None:
    env = {**BASE_ENV, "GATEWAY_CACHE_ENABLED": "false", "GATEWAY_CACHE__ENABLED": "false"}
    with pytest.raises(
        ConfigError,
        match="environment: GATEWAY_CACHE_ENABLED: GATEWAY_CACHE__ENABLED is set too",
    ):
        load_settings(env=env)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GATEWAY_CACHE_ENABLED", "maybe", "GATEWAY_CACHE_ENABLED: Input should be a valid bool"),
        ("GATEWAY_DEMO", "sure", "GATEWAY_DEMO: Input should be a valid boolean"),
        ("GATEWAY_POOL_NAMESPACE", "has spaces", "GATEWAY_POOL_NAMESPACE: String should match"),
        ("GATEWAY_LIMITS__MAX_PARTS", "lots", "GATEWAY_LIMITS__MAX_PARTS: Input should be a valid"),
        ("GATEWAY_CACHE__BOGUS", "1", "GATEWAY_CACHE__BOGUS: Extra inputs are not permitted"),
        ("GATEWAY_CACHE", "{oops", r"GATEWAY_CACHE \(or GATEWAY_CACHE__\.\.\.\): not valid JSON"),
        ("GATEWAY_PUBLIC_BASE_URL", "ftp://x", "GATEWAY_PUBLIC_BASE_URL: .*expected an http"),
    ],
)
def test_config_bad_environment_value_names_the_variable(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**BASE_ENV, variable: value})
    text = str(caught.value)
    assert text.startswith("environment: ") and re.search(message, text), text


def test_config_problems_in_file_and_environment_are_each_blamed_on_their_source(
    tmp_path: Path,
) -> None:
    path = write_gateway_config(tmp_path, limits={"max_parts": "lots"})
    with pytest.raises(ConfigError) as caught:
        load_settings(
            env={**BASE_ENV, "GATEWAY_CONFIG": str(path), "GATEWAY_RETRY__MAX_ATTEMPTS": "zero"}
        )
    lines = str(caught.value).splitlines()
    assert any(line.startswith(f"{path}: limits.max_parts: ") for line in lines), lines
    assert any(line.startswith("environment: GATEWAY_RETRY__MAX_ATTEMPTS: ") for line in lines)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"client_keys": ["igw-in-a-file-1111"]}, "client_keys: keys never go in this file"),
        ({"admin_keys": "igw-in-a-file-1111"}, "admin_keys: keys never go in this file"),
        ({"metrics_token": "igw-in-a-file-1111"}, "metrics_token: tokens never go in this file"),
        (
            {"clients": {"named": {"team": {"keys": ["igw-in-a-file-1111"]}}}},
            "clients.named.team.keys: keys never go in this file",
        ),
        (
            {"image_urls": {"proxy_auth": "user:igw-in-a-file-1111"}},
            "image_urls.proxy_auth: credentials never go in this file",
        ),
        ({"demo": True}, "demo: not a key of this file"),
        ({"environment": {"X": "igw-in-a-file-1111"}}, "environment: not a key of this file"),
    ],
)
def test_config_secrets_and_switches_never_come_from_the_file(
    tmp_path: Path, overrides: dict[str, object], message: str
) -> None:
    path = write_gateway_config(tmp_path, **overrides)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**BASE_ENV, "GATEWAY_CONFIG": str(path)})
    assert str(caught.value).startswith(f"{path}: {message}")
    assert "igw-in-a-file-1111" not in str(caught.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GATEWAY_UPSTREAMS__DEFAULT__KEYS", json.dumps(["sk-direct-1111"])),
        ("GATEWAY_UPSTREAMS", json.dumps({"default": {"key_specs": ["sk-direct-1111"]}})),
        ("GATEWAY_CLIENTS__NAMED__TEAM__KEYS", json.dumps(["sk-direct-1111"])),
        ("GATEWAY_IMAGE_URLS__PROXY_AUTH", "user:sk-direct-1111"),
    ],
)
def test_config_keys_come_only_from_the_variables_the_config_names(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env={**BASE_ENV, variable: value})
    assert str(caught.value).startswith("environment: GATEWAY_")
    assert "are only read from the variable the config names" in str(caught.value)
    assert "sk-direct-1111" not in str(caught.value)


def test_config_unrelated_variables_are_left_alone() -> None:
    settings = load_settings(
        env={
            **BASE_ENV,
            # Names another tool might give its own variables: none of them is a setting.
            "GATEWAY_ENVIRONMENT": "production",
            "GATEWAY_TEST_REDIS_URL": "redis://127.0.0.1:1/0",
            "GATEWAY_VERSION": "1.2.3",
            "PROMETHEUS_MULTIPROC_DIR": "/tmp/shared-metrics",
        }
    )
    assert settings.metrics_multiprocess_dir == "/tmp/shared-metrics"
    assert settings.environment["GATEWAY_ENVIRONMENT"].get_secret_value() == "production"
    assert "production" not in repr(settings) and "environment" not in settings.model_dump()


def test_settings_alone_read_the_process_environment_and_the_file() -> None:
    """`Settings()` (what pydantic-settings users reach for) reads the same sources as
    load_settings(); run in a child process, whose environment the test sets."""
    script = (
        "from app.config.settings import Settings; s = Settings(); "
        "print(s.upstreams['default'].base_url, s.cache.enabled, s.limits.max_in_flight, "
        "len(s.upstreams['default'].keys))"
    )
    env = {
        **BASE_ENV,
        "GATEWAY_UPSTREAM_URL": "http://child.example/v1",
        "GATEWAY_CACHE_ENABLED": "false",
        "GATEWAY_LIMITS__MAX_IN_FLIGHT": "9",
    }
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.split() == ["http://child.example/v1", "False", "9", "2"]
