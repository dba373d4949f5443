"""Fast fake upstreams for the benchmark: nginx (Debian's package plus its echo module) answers a
canned ImagesResponse after reading the whole body; a uvloop + httptools server does the same,
optionally after a delay, where nginx is missing or a slow upstream is wanted.

The asyncio one also takes faults at run time (the soak's seam, tests/bench/soak.py): `PUT
/_faults` with a JSON `Faults` sets a delay, a share of calls answered with an error status, and
the same per upstream key; `AsyncioUpstream.set_faults()` sends it. Stop and start the process to
have the upstream refuse connections for a while.

Run the asyncio one alone: `python -m tests.bench.upstream --port 9000 --delay 2`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
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
        """Start (or start again, on the same port, with no faults) the upstream process."""
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

    def set_faults(self, faults: Faults) -> None:
        """Replace what the upstream does to each call from now on."""
        base = self.url.removesuffix("/v1")
        httpx.put(base + FAULTS_PATH, json=asdict(faults), timeout=10).raise_for_status()


def fast_upstream(prefer_nginx: bool = True) -> Upstream:
    if prefer_nginx and nginx_available():
        return NginxUpstream().start()
    return AsyncioUpstream().start()


# --- the asyncio server itself -------------------------------------------------------------------

FAULTS_PATH = "/_faults"


@dataclass
class Faults:
    """What the asyncio upstream does to a call: wait `delay` seconds, then answer
    `error_status` to a share `error_rate` of calls (429s carry `retry_after`), else succeed.
    `keys` overrides any of these per upstream key (the bearer token the call carried)."""

    delay: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    retry_after: float = 1.0
    keys: dict[str, dict[str, float]] = field(default_factory=dict)

    def for_key(self, key: str | None) -> Faults:
        override = self.keys.get(key or "")
        if not override:
            return self
        return Faults(**{**asdict(self), **override, "keys": {}})


def _response(status: int, body: bytes, *headers: str) -> bytes:
    reason = {200: "OK", 204: "No Content", 429: "Too Many Requests"}.get(status, "Error")
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json"]
    head += [*headers, f"content-length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _error_response(faults: Faults) -> bytes:
    status = faults.error_status
    body = orjson.dumps(
        {
            "error": {
                "message": f"injected failure {status}",
                "type": "rate_limit_exceeded" if status == 429 else "server_error",
                "param": None,
                "code": "rate_limit_exceeded" if status == 429 else None,
            }
        }
    )
    extra = [f"retry-after: {faults.retry_after:g}"] if status == 429 else []
    return _response(status, body, *extra)


_RESPONSE = _response(200, IMAGES_RESPONSE)
_NO_CONTENT = b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"


class _Protocol(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        import httptools

        self._state = state
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._key: str | None = None
        self._control: list[bytes] | None = None  # the body of a PUT /_faults

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except Exception:
            if self._transport is not None:
                self._transport.close()

    def on_message_begin(self) -> None:
        self._url = b""
        self._key = None
        self._control = None

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"authorization":
            self._key = value.decode("latin-1").removeprefix("Bearer ")

    def on_headers_complete(self) -> None:
        if self._url == FAULTS_PATH.encode():
            self._control = []

    def on_body(self, body: bytes) -> None:
        # An edit's body is read (and dropped) chunk by chunk; only a control body is kept.
        if self._control is not None:
            self._control.append(body)

    def on_message_complete(self) -> None:
        if self._control is not None:
            raw: dict[str, Any] = orjson.loads(b"".join(self._control))
            self._state.faults = Faults(**raw)
            self._write(_NO_CONTENT)
            return
        faults = self._state.faults.for_key(self._key)
        failing = faults.error_rate > 0 and self._state.rng.random() < faults.error_rate
        answer = _error_response(faults) if failing else _RESPONSE
        # Answer once the body is all in, after the delay.
        if faults.delay > 0:
            asyncio.get_running_loop().call_later(faults.delay, self._write, answer)
        else:
            self._write(answer)

    def _write(self, answer: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(answer)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None


@dataclass
class _State:
    faults: Faults
    rng: random.Random


async def _serve(port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()
    state = _State(Faults(delay=delay), random.Random(port))
    server = await loop.create_server(
        lambda: _Protocol(state), "127.0.0.1", port, backlog=4096, reuse_address=True
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
