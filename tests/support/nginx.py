"""nginx in front of gateway replicas, as deployed (round robin, uploads streamed), on a free
loopback port with its config and logs in a temp dir; stopped on exit. Each response names the
replica that served it in `x-replica`, so tests can see the requests were spread."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.debian import ensure_program
from tests.support.servers import free_port, wait_for_port

REPLICA_HEADER = "x-replica"


def _find_nginx() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )


def nginx_binary() -> str:
    return ensure_program(_find_nginx, "nginx-light")


def nginx_config(directory: Path, port: int, backends: list[str]) -> str:
    servers = "\n".join(f"    server {backend} max_fails=0;" for backend in backends)
    temp = "\n".join(
        f"  {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # Workers run as root when the test does: they must reach the temp dir, which is private.
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}worker_processes 1;
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 512; }}
http {{
  access_log off;
{temp}
  upstream gateways {{
{servers}
    keepalive 16;
  }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 220m;
    proxy_request_buffering off;
    proxy_buffering off;
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $http_host;
      proxy_next_upstream error timeout http_503;
      add_header {REPLICA_HEADER} $upstream_addr always;
    }}
  }}
}}
"""


@contextmanager
def nginx_round_robin(backends: list[str]) -> Iterator[str]:
    """The URL of nginx spreading requests over `backends` ("127.0.0.1:port" each)."""
    directory = Path(tempfile.mkdtemp(prefix="gw-nginx-"))
    port = free_port()
    config = directory / "nginx.conf"
    config.write_text(nginx_config(directory, port, backends))
    process = subprocess.Popen(
        [
            nginx_binary(),
            "-p",
            str(directory),
            "-c",
            str(config),
            "-e",
            str(directory / "error.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=15)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGQUIT)  # graceful: finish responses in flight
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        shutil.rmtree(directory, ignore_errors=True)
