"""docker-compose.yml and the files it mounts fit together: Redis is health-gated, the gateway
scales behind nginx, Prometheus loads the alert rules, Grafana gets its dashboard.

There is no Docker engine where the tests run. `docker compose config` (or the standalone
`docker-compose config`) is run when a Compose CLI is installed; the structural checks below
always run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from app.config.settings import load_settings
from app.shared_state.factory import RedisTarget

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> repository file for each bind mount."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = REPO / source
    return found


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone is not None else None


def test_compose_runs_the_whole_stack() -> None:
    services = compose()["services"]
    assert set(services) >= {"gateway", "nginx", "redis", "prometheus", "grafana"}
    for name, service in services.items():
        assert "image" in service or "build" in service, name
    cli = compose_cli()
    if cli is not None:  # the real validator, where a Compose CLI is installed
        result = subprocess.run(
            [*cli, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr


def test_compose_gates_the_gateway_on_a_healthy_redis() -> None:
    services = compose()["services"]
    for name in ("redis", "redis-cache"):
        assert services[name]["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
        assert services["gateway"]["depends_on"][name]["condition"] == "service_healthy"
    # `${GATEWAY_REDIS_URL:-...}`: the compose Redis unless the scale-out profile's URL is given.
    assert "redis://redis:" in services["gateway"]["environment"]["GATEWAY_REDIS_URL"]


def redis_options(service: dict[str, Any]) -> dict[str, str]:
    """A redis-server command's `--name value...` options (values joined by a space)."""
    command = [str(word) for word in service["command"]]
    assert command[0] == "redis-server" and command[1].startswith("--"), command
    options: dict[str, list[str]] = {}
    for word in command[1:]:
        if word.startswith("--"):
            current = options.setdefault(word.removeprefix("--"), [])
        else:
            current.append(word)
    return {name: " ".join(values) for name, values in options.items()}


def test_compose_keeps_state_and_cache_on_separate_redis_servers() -> None:
    """State persists (AOF fsynced every second) and is never evicted; the cache may be evicted
    and keeps nothing on disk. As Compose renders it where a Compose CLI is installed."""
    cli = compose_cli()
    if cli is not None:
        rendered = subprocess.run(
            [*cli, "-f", str(COMPOSE), "--profile", "scaleout", "config"],
            capture_output=True,
            text=True,
            check=False,
            env={"PATH": os.environ["PATH"]},
        )
        assert rendered.returncode == 0, rendered.stderr
        services = yaml.safe_load(rendered.stdout)["services"]
    else:
        services = compose()["services"]
    state = redis_options(services["redis"])
    assert state["appendonly"] == "yes" and state["appendfsync"] == "everysec"
    assert state["maxmemory-policy"] == "noeviction"
    assert "/data" in volume_targets(services["redis"])
    cache = redis_options(services["redis-cache"])
    assert cache["save"] == "" and cache["appendonly"] == "no"
    assert cache["maxmemory"] and cache["maxmemory-policy"] == "allkeys-lru"
    assert not volume_targets(services["redis-cache"])
    # The replica becomes the primary after a failover: the same persistence and policy.
    replica = redis_options(services["redis-replica"])
    for name in ("appendonly", "appendfsync", "maxmemory-policy"):
        assert replica[name] == state[name], name
    assert "save" not in replica and "maxmemory" not in replica
    assert "/data" in volume_targets(services["redis-replica"])
    # With nothing set, the gateway puts state on `redis` and the cache on `redis-cache`.
    env = services["gateway"]["environment"]
    if cli is not None:
        assert env["GATEWAY_REDIS_URL"] == "redis://redis:6379/0"
        assert env["GATEWAY_CACHE_REDIS_URL"] == "redis://redis-cache:6379/0"
    else:
        assert env["GATEWAY_CACHE_REDIS_URL"] == (
            "${GATEWAY_CACHE_REDIS_URL:-redis://redis-cache:6379/0}"
        )


def volume_targets(service: dict[str, Any]) -> list[str]:
    """Container paths of a service's volumes, short (`src:/path`) or long syntax."""
    targets = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            targets.append(str(volume["target"]))
        else:
            targets.append(str(volume).split(":")[1])
    return targets


def test_compose_gateway_scales_behind_nginx() -> None:
    services = compose()["services"]
    gateway, nginx = services["gateway"], services["nginx"]
    # A fixed host port would make `--scale gateway=3` fail on the second replica.
    assert "ports" not in gateway and "container_name" not in gateway
    assert nginx["ports"] == ["127.0.0.1:8080:8080"]  # the demo serves anyone who reaches it
    conf = mounts(nginx)["/etc/nginx/nginx.conf"].read_text()
    assert "server gateway:8080 resolve;" in conf and "resolver 127.0.0.11" in conf
    assert "location = /metrics" in conf  # not reachable from outside
    # Docker must wait out the gateway's drain before it kills a replica.
    drain = load_settings(
        env={"GATEWAY_CONFIG": str(REPO / "config" / "gateway.yaml"), "GATEWAY_DEMO": "true"}
    ).shutdown.drain_timeout
    assert int(gateway["stop_grace_period"].removesuffix("s")) > drain


def test_compose_prometheus_scrapes_every_replica_and_loads_the_alerts() -> None:
    service = compose()["services"]["prometheus"]
    files = mounts(service)
    config = yaml.safe_load(files["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in config["rule_files"]:
        assert files[rule_file].exists()
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == "image-gateway")
    assert job["dns_sd_configs"][0]["names"] == ["gateway"]
    assert compose()["services"]["gateway"]["environment"]["GATEWAY_METRICS_PUBLIC"] == "true"


def test_compose_grafana_is_provisioned_with_the_datasource_and_dashboard() -> None:
    service = compose()["services"]["grafana"]
    files = mounts(service)
    provisioning = files["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090" and datasource["uid"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "image-gateway.yml").read_text())[
        "providers"
    ]
    dashboards = files[provider["options"]["path"]]
    assert (dashboards / "image-gateway.json").exists()


def test_compose_scaleout_profile_runs_sentinels_the_documented_url_names() -> None:
    services = compose()["services"]
    profiled = {
        name for name, service in services.items() if "scaleout" in service.get("profiles", [])
    }
    assert profiled == {"redis-replica", "sentinel-1", "sentinel-2", "sentinel-3"}
    command = services["redis-replica"]["command"]
    assert command[command.index("--replicaof") + 1] == "redis"
    documented = next(
        line.split("GATEWAY_REDIS_URL=")[1].split()[0]
        for line in COMPOSE.read_text().splitlines()
        if "GATEWAY_REDIS_URL=redis+sentinel://" in line
    )
    target = RedisTarget.parse(documented)
    assert target.mode == "sentinel"
    assert {host for host, _port in target.nodes} == {"sentinel-1", "sentinel-2", "sentinel-3"}
    for name in ("sentinel-1", "sentinel-2", "sentinel-3"):
        script = services[name]["command"][0]
        assert f"sentinel monitor {target.service} redis 6379 2" in script
