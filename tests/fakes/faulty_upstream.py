"""A fault-injecting OpenAI-compatible upstream: per-key scripted failures, refused keys, a seeded
share of failing calls, and a listener a test can take down and bring back.

Built on FakeOpenAIUpstream (same recording, same wire parsing); adds what the key pool needs:
a reply per key for every edit, keys the upstream refuses (401 on edits and on GET /models,
the probe), hangs that end when the test ends, an upstream-wide storm (a share of all edits,
whatever the key, answered with one error, drawn from a seeded rng so a run can be replayed),
and `SwitchableListener`, which makes the host refuse connections as a killed upstream does.
"""

from __future__ import annotations

import random
import socket
import threading
import time

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tests.fakes.openai_upstream import FakeOpenAIUpstream, RecordedRequest, Reply


def error_reply(status: int, code: str | None = None, **headers: str) -> Reply:
    body = {
        "error": {
            "message": f"scripted failure {status}",
            "type": "invalid_request_error" if status < 500 else "server_error",
            "param": None,
            "code": code,
        }
    }
    return Reply(
        status=status, body=body, headers={k.replace("_", "-"): v for k, v in headers.items()}
    )


class FaultyUpstream(FakeOpenAIUpstream):
    def __init__(self) -> None:
        super().__init__()
        # key -> the reply every edit made with that key gets (absent: a normal answer).
        self.by_key: dict[str, Reply] = {}
        # Keys answered 401 on every path, the probe's GET /models included.
        self.refused_keys: set[str] = set()
        # Every answer waits this long, so concurrent clients overlap upstream as in production.
        self.latency = 0.0
        self._storm_share = 0.0
        self._storm_reply = error_reply(500)
        self._storm_rng = random.Random(0)
        # Edits answered by the storm (the injected failures), and edits seen while it blew.
        self.storm_failures = 0
        self.storm_edits = 0
        self.responder = self._by_key

    def start_storm(self, share: float, *, seed: int, reply: Reply | None = None) -> None:
        """From now on, `share` of all edits (any key) get `reply` (a 500 unless told)."""
        self._storm_rng = random.Random(seed)
        self._storm_share = share
        self._storm_reply = reply or error_reply(500)
        self.storm_failures = self.storm_edits = 0

    def end_storm(self) -> None:
        self._storm_share = 0.0

    def _by_key(self, record: RecordedRequest) -> Reply:
        if record.key in self.refused_keys:
            return error_reply(401, "invalid_api_key")
        scripted = self.by_key.get(record.key or "")
        if scripted is not None:
            return scripted
        if self._storm_share:
            # One event loop serves every edit, so the draws happen in arrival order.
            self.storm_edits += 1
            if self._storm_rng.random() < self._storm_share:
                self.storm_failures += 1
                return _delayed(self._storm_reply, self.latency)
        return Reply(delay=self.latency)

    def edits_with(self, key: str) -> int:
        return sum(1 for request in self.edits if request.key == key)

    @property
    def probes(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/models")]

    async def _models(self, request: Request) -> Response:
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        self.requests.append(record)
        if record.key in self.refused_keys:
            return JSONResponse(error_reply(401, "invalid_api_key").body, status_code=401)
        return JSONResponse({"object": "list", "data": []})


def _delayed(reply: Reply, delay: float) -> Reply:
    return Reply(status=reply.status, body=reply.body, headers=reply.headers, delay=delay)


class SwitchableListener:
    """Serves an app on one loopback port that `down()` closes and `up()` opens again.

    While down the port stays bound but does not listen, so every connection is refused at once
    (as from a killed upstream) and no other process can take the port in the meantime.
    """

    def __init__(self, app: Starlette) -> None:
        self._app = app
        self._socket = self._bind(0)
        self.port: int = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _bind(port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # The gateway's closed connections linger in TIME_WAIT on this port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def up(self) -> None:
        if self._server is not None:
            return
        server = uvicorn.Server(
            uvicorn.Config(self._app, loop="asyncio", log_level="warning", lifespan="off")
        )
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"fake upstream on port {self.port} did not start")
            time.sleep(0.01)
        self._server, self._thread = server, thread

    def down(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._server = self._thread = None
        # uvicorn closed the listening socket: hold the port again, bound but not listening.
        self._socket.close()
        self._socket = self._bind(self.port)

    def close(self) -> None:
        self.down()
        self._socket.close()
