"""docker-compose.yml as Compose itself renders it, and the gateway image's command, for tests.

There is no Docker engine where the tests run, but `config` (interpolation, defaults, validation)
needs none: Debian's `docker-compose` package (Compose 1.29) renders it, and `docker compose`
(v2) does when the plugin is there. The package is installed when neither is, as redis-server is
(tests/support/redis_server.py).

The Dockerfile's last stage (ENTRYPOINT, CMD, ENV, WORKDIR) is read here too: the compose service
builds the image and gives no command of its own, so what runs is the image's.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.debian import ensure_program, on_path


def compose_cli() -> list[str]:
    """`docker compose` if the plugin answers, else `docker-compose` (installed if missing)."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    # Compose 1.29 in Python; its recommended docker.io (the engine) is not needed to render.
    standalone = ensure_program(on_path("docker-compose"), "docker-compose", recommends=False)
    return [standalone]


def render(compose_file: Path, env_file: Path) -> dict[str, Any]:
    """`config` of `compose_file` with nothing but `env_file` for variables: the process runs
    under `env -i` (no variable of the caller's leaks in), and `--env-file` replaces the `.env`
    Compose would otherwise read next to the file."""
    result = subprocess.run(
        [
            "env",
            "-i",
            *compose_cli(),
            "--env-file",
            str(env_file),
            "-f",
            str(compose_file),
            "config",
        ],
        cwd=env_file.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    rendered: dict[str, Any] = yaml.safe_load(result.stdout)
    return rendered


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A rendered service's environment (a mapping or a list of NAME=value), None as empty."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {name: "" if value is None else str(value) for name, value in raw.items()}


@dataclass(frozen=True)
class Published:
    host_ip: str
    published: str
    target: str


def published_ports(service: dict[str, Any]) -> list[Published]:
    """A rendered service's published ports: Compose 1 renders `ip:host:container/proto`
    strings (or a mapping without host_ip when none is given), Compose 2 mappings."""
    found = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            found.append(
                Published(
                    str(port.get("host_ip", "")), str(port.get("published")), str(port["target"])
                )
            )
            continue
        parts = str(port).split("/")[0].split(":")
        host_ip = parts[0] if len(parts) == 3 else ""
        found.append(Published(host_ip, parts[-2] if len(parts) > 1 else "", parts[-1]))
    return found


@dataclass
class ImageStage:
    """The last stage of a Dockerfile: what a container of the image runs, and with what."""

    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = "/"


def final_stage(dockerfile: Path) -> ImageStage:
    """ENTRYPOINT and CMD (exec form), ENV (NAME=value pairs) and WORKDIR of the last stage."""
    stage = ImageStage()
    for instruction, argument in instructions(dockerfile.read_text()):
        if instruction == "FROM":
            stage = ImageStage()
        elif instruction in ("ENTRYPOINT", "CMD"):
            words = json.loads(argument)
            assert isinstance(words, list), f"{instruction} must be in exec form: {argument}"
            if instruction == "ENTRYPOINT":
                stage.entrypoint = [str(word) for word in words]
            else:
                stage.cmd = [str(word) for word in words]
        elif instruction == "ENV":
            for pair in shlex.split(argument):
                name, _, value = pair.partition("=")
                stage.env[name] = value
        elif instruction == "WORKDIR":
            stage.workdir = argument.strip()
    return stage


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, argument) per instruction, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        whole = pending + stripped
        pending = ""
        instruction, _, argument = whole.partition(" ")
        found.append((instruction.upper(), argument.strip()))
    return found
