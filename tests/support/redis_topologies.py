"""Real Redis deployments on loopback for the scale-out tests: a 3-primary Redis Cluster, and a
primary + replica watched by 3 Sentinels (fast failover timings). Every process is stopped and
its directory removed on exit. Also synchronous clients for any URL the gateway accepts."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.cluster
import redis.sentinel

from app.shared_state.factory import RedisTarget
from tests.support.redis_server import PortTaken, redis_binary, spawn_redis, wait_for_redis
from tests.support.servers import free_port

SERVICE = "igw-primary"
# Sentinel declares the primary down after this long without an answer.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def _wait(what: str, ready: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"redis topology: {what} not ready after {timeout:.0f}s")
        time.sleep(0.1)


class Deployment:
    url: str

    def __init__(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="gw-redis-topology-")
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self._commands: dict[int, tuple[str, ...]] = {}

    def _start_node(
        self, *extra: str, config: Callable[[int, Path], list[str]] | None = None
    ) -> int:
        """Start one redis-server on a fresh port (another, if that port is taken meanwhile)."""
        for _attempt in range(5):
            port = free_port()
            if port in self._processes:
                continue
            directory = Path(self._dir) / str(port)
            directory.mkdir(exist_ok=True)
            if config is None:
                process = spawn_redis(port, str(directory), *extra)
                self._commands[port] = extra
            else:
                process = subprocess.Popen(
                    [redis_binary(), *config(port, directory)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            self._processes[port] = process
            try:
                wait_for_redis(port, process)
            except PortTaken:
                del self._processes[port]
                continue
            return port
        raise RuntimeError("redis topology: no free port for redis-server")

    def kill(self, port: int) -> None:
        process = self._processes.pop(port)
        process.kill()
        process.wait(timeout=10)

    def restart(self, port: int) -> None:
        """Start a killed node again on its port, with its directory (a Cluster node rejoins)."""
        directory = Path(self._dir) / str(port)
        self._processes[port] = spawn_redis(port, str(directory), *self._commands[port])
        wait_for_redis(port, self._processes[port])

    def stop(self) -> None:
        for process in self._processes.values():
            process.terminate()
        for process in self._processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._processes.clear()
        shutil.rmtree(self._dir, ignore_errors=True)


class ClusterDeployment(Deployment):
    """Three primaries, no replicas: every slot served, keys spread over three processes."""

    def __init__(self) -> None:
        super().__init__()
        self.ports: list[int] = []
        self.url = ""

    def start(self) -> None:
        for _ in range(3):
            port = self._start_node(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            )
            self.ports.append(port)
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)
        cli = shutil.which("redis-cli") or str(Path(redis_binary()).with_name("redis-cli"))
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
        )
        self.wait_until_ok()

    def wait_until_ok(self, timeout: float = 30.0) -> None:
        def all_ok() -> bool:
            for port in self.ports:
                info = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).cluster("info")
                if info.get("cluster_state") != "ok":
                    return False
            return True

        _wait("cluster", all_ok, timeout)


class SentinelDeployment(Deployment):
    """A primary, one replica and three Sentinels with quorum 2."""

    def __init__(self) -> None:
        super().__init__()
        self.sentinel_ports: list[int] = []
        self.url = ""

    def start(self) -> None:
        # Diskless, immediate sync: a replica is in sync in milliseconds, not after 5 s.
        sync = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
        self.primary_port = self._start_node(*sync)
        self.replica_port = self._start_node(
            *sync, "--replicaof", "127.0.0.1", str(self.primary_port)
        )
        _wait(
            "replica sync",
            lambda: (
                redis.Redis(host="127.0.0.1", port=self.replica_port).info("replication")[
                    "master_link_status"
                ]
                == "up"
            ),
        )

        def sentinel_config(port: int, directory: Path) -> list[str]:
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            return [str(conf), "--sentinel"]

        for _ in range(3):
            self.sentinel_ports.append(self._start_node(config=sentinel_config))
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        self.url = f"redis+sentinel://{hosts}/{SERVICE}/0"

        def sentinels_agree() -> bool:
            for port in self.sentinel_ports:
                sentinel = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
                if len(sentinel.sentinel_sentinels(SERVICE)) < 2:
                    return False
                if not sentinel.sentinel_slaves(SERVICE):
                    return False
            return True

        # A failover needs every Sentinel to know the others (quorum) and the replica.
        _wait("sentinels", sentinels_agree)

    def primary(self) -> tuple[str, int]:
        sentinel = redis.Redis(host="127.0.0.1", port=self.sentinel_ports[0], socket_timeout=1)
        host, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return str(host), int(port)

    def kill_primary(self) -> int:
        _host, port = self.primary()
        self.kill(port)
        return port

    def wait_for_new_primary(self, old_port: int, timeout: float = 30.0) -> int:
        def promoted() -> bool:
            port = self.primary()[1]
            if port == old_port:
                return False
            role = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).info("replication")[
                "role"
            ]
            return bool(role == "master")

        _wait("failover", promoted, timeout)
        return self.primary()[1]


TOPOLOGIES: dict[str, type[ClusterDeployment] | type[SentinelDeployment]] = {
    "cluster": ClusterDeployment,
    "sentinel": SentinelDeployment,
}


@contextmanager
def running_topology(name: str) -> Iterator[ClusterDeployment | SentinelDeployment]:
    if name not in TOPOLOGIES:
        raise ValueError(f"GATEWAY_TEST_REDIS_TOPOLOGY: unknown topology {name!r}")
    deployment = TOPOLOGIES[name]()
    try:
        deployment.start()
        yield deployment
    finally:
        deployment.stop()


def sync_redis(url: str, **options: Any) -> Any:
    """A synchronous client for any URL the gateway accepts (tests inspect Redis with it)."""
    target = RedisTarget.parse(url)
    if target.mode == "single":
        return redis.Redis.from_url(url, **options)
    if target.mode == "cluster":
        nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.nodes]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **options)
    sentinel = redis.sentinel.Sentinel(list(target.nodes), **options)
    return sentinel.master_for(target.service, db=target.db, **options)


def with_db(url: str, db: int) -> str:
    """The same deployment, another database (a Cluster has database 0 only: kept)."""
    target = RedisTarget.parse(url)
    if target.mode == "cluster":
        return url
    if target.mode == "sentinel":
        base, _, query = url.partition("?")
        scheme, _, rest = base.partition("://")
        netloc = rest.partition("/")[0]
        return f"{scheme}://{netloc}/{target.service}/{db}" + (f"?{query}" if query else "")
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{db}"))
