"""A fake OpenAI-compatible upstream on a real port: records every request, replies as scripted.

It parses multipart with Starlette's own form parser, independently of the gateway's intake, so
tests compare what really went over the wire.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support import images

RESULT_PNG = images.png(16, 16, colour=(250, 0, 0))


@dataclass
class RecordedFile:
    field: str
    filename: str | None
    content_type: str | None
    data: bytes

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    fields: list[tuple[str, str]] = field(default_factory=list)
    files: list[RecordedFile] = field(default_factory=list)

    def field_map(self) -> dict[str, str]:
        return dict(self.fields)

    @property
    def key(self) -> str | None:
        auth = self.headers.get("authorization", "")
        return auth.removeprefix("Bearer ") if auth else None


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # dict -> JSON; bytes -> raw; None -> an ImagesResponse for the request's n
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    drop_connection: bool = False


def images_response(n: int, *, with_usage_details: bool = False) -> dict[str, Any]:
    usage: dict[str, Any] = {"input_tokens": 50, "output_tokens": 100, "total_tokens": 150}
    if with_usage_details:
        usage["input_tokens_details"] = {"text_tokens": 10, "image_tokens": 40}
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(RESULT_PNG).decode()} for _ in range(n)],
        "usage": usage,
    }


class FakeOpenAIUpstream:
    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.replies: deque[Reply] = deque()
        # Called for each edit when no scripted reply is queued; returns the reply to send.
        self.responder: Callable[[RecordedRequest], Reply] | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/images/edits", self._edit, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def reset(self) -> None:
        self.requests.clear()
        self.replies.clear()
        self.responder = None

    def enqueue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    @property
    def edits(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/images/edits")]

    async def _edit(self, request: Request) -> Response:
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        form = await request.form(max_files=100, max_fields=1000, max_part_size=64 * 1024 * 1024)
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                record.files.append(
                    RecordedFile(name, value.filename, value.content_type, await value.read())
                )
            else:
                record.fields.append((name, value))
        self.requests.append(record)
        if self.replies:
            reply = self.replies.popleft()
        elif self.responder is not None:
            reply = self.responder(record)
        else:
            reply = Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.drop_connection:
            raise ConnectionAbortedError("fake upstream drops the connection")
        if reply.body is None:
            body: Any = images_response(int(record.field_map().get("n", "1")))
        else:
            body = reply.body
        if isinstance(body, bytes):
            return Response(body, status_code=reply.status, headers=reply.headers)
        return JSONResponse(body, status_code=reply.status, headers=reply.headers)

    async def _models(self, request: Request) -> Response:
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.url.path,
                headers={k.lower(): v for k, v in request.headers.items()},
            )
        )
        return JSONResponse({"object": "list", "data": []})
