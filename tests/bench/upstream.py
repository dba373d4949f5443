"""Fast fake upstreams for the benchmark: nginx (Debian's package plus its echo module) answers a
canned ImagesResponse after reading the whole body; a uvloop + httptools server does the same,
optionally after a delay, where nginx is missing or a slow upstream is wanted.

Run the asyncio one alone: `python -m tests.bench.upstream --port 9000 --delay 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import cast

import orjson

from tests.support import images
from tests.support.servers import free_port, wait_for_port

# What OpenAI answers for one edit, with a small image so the response is not what is measured.
IMAGES_RESPONSE = orjson.dumps(
    {
        "created": 1764000000,
        "data": [{"b64_json": base64.b64encode(images.png(16, 16)).decode()}],
        "background": "opaque",
        "output_format": "png",
        "quality": "medium",
        "size": "1024x1024",
        "usage": {
            "input_tokens": 50,
            "output_tokens": 100,
            "total_tokens": 150,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 40},
        },
    }
)

ECHO_MODULE = Path("/usr/lib/nginx/modules/ngx_http_echo_module.so")


def _apt_install(*packages: str) -> None:
    if not shutil.which("apt-get") or os.geteuid() != 0:
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env, timeout=300)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *packages],
        check=False,
        env=env,
        timeout=600,
        stdout=subprocess.DEVNULL,
    )


def nginx_available(install: bool = True) -> bool:
    if install and (not shutil.which("nginx") or not ECHO_MODULE.exists()):
        _apt_install("nginx", "libnginx-mod-http-echo")
    return bool(shutil.which("nginx")) and ECHO_MODULE.exists()


class Upstream:
    """A fake upstream process listening on 127.0.0.1:port."""

    kind = "?"

    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


class NginxUpstream(Upstream):
    kind = "nginx"

    def __init__(self) -> None:
        super().__init__()
        self._dir = Path(tempfile.mkdtemp(prefix="gw-bench-nginx-"))

    def start(self) -> NginxUpstream:
        d = self._dir
        user = "user root root;\n" if os.geteuid() == 0 else ""
        # One worker: the gateway is one process too. The body is read in full into memory
        # (client_body_buffer_size) before answering, as a real upstream would.
        conf = f"""
load_module {ECHO_MODULE};
{user}worker_processes 1;
error_log {d}/error.log error;
pid {d}/nginx.pid;
events {{ worker_connections 8192; multi_accept on; }}
http {{
  access_log off;
  client_max_body_size 0;
  client_body_buffer_size 64m;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location = /v1/images/edits {{
      default_type application/json;
      echo_read_request_body;
      echo -n '{IMAGES_RESPONSE.decode()}';
    }}
  }}
}}
"""
        (d / "nginx.conf").write_text(conf)
        self.process = subprocess.Popen(
            ["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=open(d / "stderr.log", "wb"),  # noqa: SIM115 - lives as long as nginx
        )
        wait_for_port(self.port)
        return self

    @property
    def pid(self) -> int:
        # The worker does the work; the master only supervises it.
        assert self.process is not None
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        found = children.read_text().split() if children.exists() else []
        return int(found[0]) if found else self.process.pid

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._dir, ignore_errors=True)


class AsyncioUpstream(Upstream):
    kind = "asyncio"

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay

    def start(self) -> AsyncioUpstream:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.bench.upstream",
                "--port",
                str(self.port),
                "--delay",
                str(self.delay),
            ],
            stdout=subprocess.DEVNULL,
        )
        wait_for_port(self.port)
        return self


def fast_upstream(prefer_nginx: bool = True) -> Upstream:
    if prefer_nginx and nginx_available():
        return NginxUpstream().start()
    return AsyncioUpstream().start()


# --- the asyncio server itself -------------------------------------------------------------------

_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(IMAGES_RESPONSE)).encode()
    + b"\r\n\r\n"
    + IMAGES_RESPONSE
)


class _Protocol(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        import httptools

        self._delay = delay
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except Exception:
            if self._transport is not None:
                self._transport.close()

    def on_message_complete(self) -> None:
        # The body was read (and dropped) chunk by chunk; answer once it is all in.
        if self._delay > 0:
            asyncio.get_running_loop().call_later(self._delay, self._reply)
        else:
            self._reply()

    def _reply(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_RESPONSE)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


async def _serve(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Protocol(delay), "127.0.0.1", port, backlog=4096, reuse_address=True
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    import uvloop

    uvloop.run(_serve(args.port, args.delay))


if __name__ == "__main__":
    main()
