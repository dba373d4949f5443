"""Acceptance: `docker compose up` with nothing set serves the demo, published on 127.0.0.1 only,
and `.env.example` is a working real-upstream configuration.

There is no Docker engine here, so the test does what a container would: Compose renders the file
for an empty environment (`env -i`, an empty env file), and the gateway service's command (the
image's ENTRYPOINT + CMD: the service sets none) runs as a subprocess with exactly the rendered
environment plus the image's ENV. Mapped, and only these: the container's paths (WORKDIR) to this
checkout, the bind address and port to a free loopback port, the compose Redis to the test's
private one. Then the real SDK makes an edit.
"""

from __future__ import annotations

import base64
import io
import os
import re
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from app.config.settings import load_settings
from tests.support import images
from tests.support.compose import (
    environment,
    final_stage,
    published_ports,
    render,
)
from tests.support.constants import REPO
from tests.support.gateway_process import gateway_command
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, wait_for_port

COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
ENV_EXAMPLE = REPO / ".env.example"
# The compose services the gateway's Redis URLs name (state, cache); the test's private Redis
# stands in for both.
COMPOSE_REDIS = "redis://redis:6379/0"
COMPOSE_CACHE_REDIS = "redis://redis-cache:6379/0"


@pytest.fixture
def empty_env_file(tmp_path: Path) -> Path:
    path = tmp_path / "empty.env"
    path.write_text("")
    return path


def container_command(service: dict[str, object]) -> list[str]:
    """What the gateway container runs: the service's entrypoint/command, else the image's."""
    stage = final_stage(REPO / "Dockerfile")
    entrypoint = service.get("entrypoint") or stage.entrypoint
    command = service.get("command") or stage.cmd
    assert isinstance(entrypoint, list) and isinstance(command, list)
    return [str(word) for word in (*entrypoint, *command)]


def outside_docker(argv: list[str], port: int) -> list[str]:
    """The container's argv on this machine: the installed script, a loopback address and port."""
    assert argv[0] == "image-gateway", argv
    mapped = [*gateway_command(), *argv[1:]]
    for option, value in (("--host", "127.0.0.1"), ("--port", str(port))):
        assert option in mapped, f"the container command sets no {option}: {argv}"
        mapped[mapped.index(option) + 1] = value
    return mapped


def container_env(service: dict[str, object], redis_url: str) -> dict[str, str]:
    stage = final_stage(DOCKERFILE)
    workdir = stage.workdir.rstrip("/") + "/"
    env = {
        # The image's own ENV, its paths moved from WORKDIR (where `COPY config` put config/)
        # to this checkout; its PATH is the image's venv, this machine's stands in.
        **{
            name: value.replace(workdir, str(REPO) + "/")
            for name, value in stage.env.items()
            if name != "PATH"
        },
        **environment(service),  # type: ignore[arg-type]
        "PATH": os.environ["PATH"],
    }
    assert env["GATEWAY_REDIS_URL"] == COMPOSE_REDIS
    assert env["GATEWAY_CACHE_REDIS_URL"] == COMPOSE_CACHE_REDIS
    env["GATEWAY_REDIS_URL"] = env["GATEWAY_CACHE_REDIS_URL"] = redis_url
    return env


def wait_serving(process: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
    """Until the port answers; fails at once, with its output, if the gateway exits."""
    for _ in range(60):
        if process.poll() is not None:
            pytest.fail(f"gateway exited {process.returncode}:\n{log_path.read_text()}")
        try:
            wait_for_port(port, timeout=0.5)
            return
        except RuntimeError:
            continue
    pytest.fail(f"gateway not listening after 30 s:\n{log_path.read_text()}")


def test_compose_with_nothing_set_serves_the_demo(
    tmp_path: Path, empty_env_file: Path, redis_url: str
) -> None:
    services = render(COMPOSE, empty_env_file)["services"]
    gateway = services["gateway"]
    # Nothing published on any address but loopback; the gateway only behind nginx.
    assert "ports" not in gateway
    for name, service in services.items():
        for port in published_ports(service):
            assert port.host_ip == "127.0.0.1", (name, port)
    assert [(p.published, p.target) for p in published_ports(services["nginx"])] == [
        ("8080", "8080")
    ]

    port = free_port()
    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            outside_docker(container_command(gateway), port),
            cwd=tmp_path,  # the image's WORKDIR holds only config/: nothing from the checkout
            env=container_env(gateway, redis_url),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_serving(process, port, log_path)
        client = sdk_client(f"http://127.0.0.1:{port}", key="no-key-needed-for-the-demo")
        listed = client.models.list()
        assert {model.owned_by for model in listed.data} == {"image-gateway-demo"}
        result = client.images.edit(
            image=("in.png", images.png(64, 48, colour=(90, 90, 90)), "image/png"),
            prompt="a compose demo edit",
        )
        assert result.data[0].b64_json is not None
        edited = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
        assert edited.format == "PNG" and edited.size == (64, 48)
        assert edited.convert("RGB").getpixel((10, 10)) != (90, 90, 90)  # really edited
        assert process.poll() is None  # still serving, not in a restart loop
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_env_example_is_a_real_upstream_configuration_the_gateway_accepts() -> None:
    services = render(COMPOSE, ENV_EXAMPLE)["services"]
    env = environment(services["gateway"])
    assert env["GATEWAY_DEMO"] == "false"
    assert env["GATEWAY_UPSTREAM_KEYS"] and env["GATEWAY_CLIENT_KEYS"]
    assert environment(services["grafana"])["GF_SECURITY_ADMIN_PASSWORD"] != "admin"
    stage = final_stage(DOCKERFILE)
    config = stage.env["GATEWAY_CONFIG"].replace(stage.workdir, str(REPO))
    settings = load_settings(env={**env, "GATEWAY_CONFIG": config})
    assert not settings.demo and settings.client_keys and not settings.allow_anonymous
    assert [key.get_secret_value() for key in settings.upstreams["default"].keys] == [
        env["GATEWAY_UPSTREAM_KEYS"]
    ]


def test_env_example_documents_every_variable_compose_reads() -> None:
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", COMPOSE.read_text()))
    documented = set(re.findall(r"^#?\s*([A-Z_][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.M))
    assert used and used <= documented, sorted(used - documented)


def test_dockerfile_reader_takes_the_last_stage() -> None:
    stage = final_stage(DOCKERFILE)
    # The first stage has no CMD; the runtime stage's ENTRYPOINT, CMD and ENV are what run.
    assert stage.entrypoint[:2] == ["image-gateway", "serve"]
    assert "--host" in stage.cmd and "--port" in stage.cmd
    assert stage.env["GATEWAY_CONFIG"].startswith(stage.workdir)
    assert "HEALTHCHECK" not in " ".join(stage.cmd)
