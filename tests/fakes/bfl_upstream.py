"""A fake Black Forest Labs API on a real port: Kontext and FLUX.2 submit endpoints with an x-key
check, a polling endpoint answering scripted status sequences, and result downloads. Records
every hit.

The same class doubles as a decoy: a server on a host the gateway must refuse, which records any
request that reaches it (a refused URL must never be fetched).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support import images

ENDPOINTS = (
    "flux-kontext-pro",
    "flux-kontext-max",
    "flux-2-pro",
    "flux-2-max",
    "flux-2-flex",
    "flux-2-klein-4b",
    "flux-2-klein-9b",
)
DEFAULT_STATUSES = ("Pending", "Ready")


@dataclass
class Hit:
    method: str
    path: str
    query: str
    headers: dict[str, str]


@dataclass
class BflTask:
    id: str
    index: int  # submission order, from 0
    endpoint: str
    body: dict[str, Any]
    key: str
    statuses: deque[str]
    result: bytes
    polls: int = 0

    def image(self, field_name: str) -> bytes | None:
        value = self.body.get(field_name)
        return base64.b64decode(value) if isinstance(value, str) else None

    def image_sha(self, field_name: str) -> str | None:
        data = self.image(field_name)
        return hashlib.sha256(data).hexdigest() if data is not None else None


@dataclass
class SubmitReply:
    status: int = 200
    body: Any = None  # None: accept the task
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


def result_png(index: int) -> bytes:
    """A distinct small PNG per task, so tests can tell results apart and check their order."""
    return images.png(8, 8, colour=((37 * index + 20) % 256, 90, 160))


class FakeBflUpstream:
    # Its base URL (no /v1: BFL's paths carry it); set by whoever serves `app`.
    url: str

    def __init__(self, keys: tuple[str, ...] = ()) -> None:
        self.keys = set(keys)
        self.url = ""
        self.hits: list[Hit] = []
        self.tasks: dict[str, BflTask] = {}
        self._counter = itertools.count()
        self._generation = 0
        self.reset()
        self.app = Starlette(
            routes=[
                Route("/v1/get_result", self._get_result, methods=["GET"]),
                Route("/v1/credits", self._credits, methods=["GET"]),
                Route("/v1/{endpoint}", self._submit, methods=["POST"]),
                Route("/results/{task_id}", self._result, methods=["GET"]),
                Route("/{path:path}", self._anything, methods=["GET", "POST", "PUT", "HEAD"]),
            ]
        )

    def reset(self) -> None:
        # A submit still sleeping out its delay when a test ends must not take the next test's
        # scripted statuses: it sees the generation change and gives up.
        self._generation += 1
        self.hits.clear()
        self.tasks.clear()
        self._counter = itertools.count()
        self.submit_replies: deque[SubmitReply] = deque()
        # Status sequences for the next tasks, in submission order; then default_statuses.
        self.scripts: deque[tuple[str, ...]] = deque()
        self.default_statuses: tuple[str, ...] = DEFAULT_STATUSES
        # HTTP statuses for the next polls (before the scripted body is consulted).
        self.poll_failures: deque[int] = deque()
        self.result_failures: deque[int] = deque()
        # Where the answers point: None means this server; a base URL sends the gateway elsewhere.
        self.polling_base: str | None = None
        self.sample_base: str | None = None
        self.result_override: bytes | None = None
        # Credits per key for GET /v1/credits (the key pool's free probe); missing keys have 100.
        self.credits: dict[str, float] = {}
        # Tasks submitted whose result has not been downloaded yet, and the most seen at once.
        self.active = 0
        self.max_active = 0

    @property
    def submits(self) -> list[BflTask]:
        return sorted(self.tasks.values(), key=lambda task: task.index)

    def _record(self, request: Request) -> None:
        self.hits.append(
            Hit(
                method=request.method,
                path=request.url.path,
                query=request.url.query,
                headers={k.lower(): v for k, v in request.headers.items()},
            )
        )

    async def _submit(self, request: Request) -> Response:
        self._record(request)
        endpoint = request.path_params["endpoint"]
        if endpoint not in ENDPOINTS:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        key = request.headers.get("x-key", "")
        if key not in self.keys:
            return JSONResponse({"detail": "Not authenticated - Invalid API key"}, status_code=403)
        body = await request.json()
        if self.submit_replies:
            reply = self.submit_replies.popleft()
            if reply.delay:
                generation = self._generation
                await asyncio.sleep(reply.delay)
                if generation != self._generation:
                    return JSONResponse({"detail": "stale"}, status_code=503)
            if reply.body is not None or reply.status != 200:
                return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
        index = next(self._counter)
        task_id = f"task-{index}-{hashlib.sha256(key.encode()).hexdigest()[:6]}"
        statuses = self.scripts.popleft() if self.scripts else self.default_statuses
        self.tasks[task_id] = BflTask(
            id=task_id,
            index=index,
            endpoint=endpoint,
            body=body,
            key=key,
            statuses=deque(statuses),
            result=self.result_override or result_png(index),
        )
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        base = self.polling_base or self.url
        return JSONResponse({"id": task_id, "polling_url": f"{base}/v1/get_result?id={task_id}"})

    async def _credits(self, request: Request) -> Response:
        self._record(request)
        key = request.headers.get("x-key", "")
        if key not in self.keys:
            return JSONResponse({"detail": "Not authenticated"}, status_code=403)
        return JSONResponse({"credits": self.credits.get(key, 100.0)})

    async def _get_result(self, request: Request) -> Response:
        self._record(request)
        if request.headers.get("x-key", "") not in self.keys:
            return JSONResponse({"detail": "Not authenticated"}, status_code=403)
        if self.poll_failures:
            return JSONResponse({"detail": "busy"}, status_code=self.poll_failures.popleft())
        task = self.tasks.get(request.query_params.get("id", ""))
        if task is None:
            return JSONResponse({"id": request.query_params.get("id"), "status": "Task not found"})
        task.polls += 1
        # The last status repeats: a task left Pending stays Pending.
        status = task.statuses.popleft() if len(task.statuses) > 1 else task.statuses[0]
        body: dict[str, Any] = {"id": task.id, "status": status, "result": None}
        if status == "Ready":
            base = self.sample_base or self.url
            body["result"] = {
                "sample": f"{base}/results/{task.id}",
                "prompt": task.body.get("prompt"),
                "seed": task.body.get("seed", 0),
            }
        return JSONResponse(body)

    async def _result(self, request: Request) -> Response:
        self._record(request)
        if self.result_failures:
            return Response(b"unavailable", status_code=self.result_failures.popleft())
        task = self.tasks.get(request.path_params["task_id"])
        if task is None:
            return Response(b"not found", status_code=404)
        self.active -= 1
        return Response(task.result, media_type="image/png")

    async def _anything(self, request: Request) -> Response:
        self._record(request)
        return Response(b"decoy", status_code=200)
