"""A fake OpenAI-compatible upstream on a real port: records every request, replies as scripted.

It parses multipart with Starlette's own form parser, independently of the gateway's intake, so
tests compare what really went over the wire (every text field, and every file part with its
name, filename, Content-Type and bytes). Unscripted, it answers in the `output_format` asked
for when that is gif or svg (GPT Image 2.6), and with a PNG otherwise.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import images

RESULT_PNG = images.png(16, 16, colour=(250, 0, 0))
RESULT_GIF = images.animated_gif(16, 16, frames=3)
RESULT_SVG = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" fill="red"/></svg>'
)
RESULTS = {"gif": RESULT_GIF, "svg": RESULT_SVG}


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
    json: Any = None  # a JSON request's body (generations)

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
    # For stream=true: event i (i >= 1) waits for stream_gates[i-1] (tests release them one by
    # one, so "before the upstream finished" needs no timing); bounded by gate_timeout.
    stream_gates: list[threading.Event] = field(default_factory=list)
    gate_timeout: float = 10.0
    # After this many events: an error event (stream_error) or a dropped connection.
    stream_fail_after: int | None = None
    stream_drop: bool = False


def images_response(
    n: int, *, with_usage_details: bool = False, image: bytes = RESULT_PNG
) -> dict[str, Any]:
    usage: dict[str, Any] = {"input_tokens": 50, "output_tokens": 100, "total_tokens": 150}
    if with_usage_details:
        usage["input_tokens_details"] = {"text_tokens": 10, "image_tokens": 40}
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(image).decode()} for _ in range(n)],
        "usage": usage,
    }


class FakeOpenAIUpstream:
    # Its base URL ending in /v1, as a gateway config names it; set by whoever serves `app`.
    url: str

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.replies: deque[Reply] = deque()
        # Called for each edit when no scripted reply is queued; returns the reply to send.
        self.responder: Callable[[RecordedRequest], Reply] | None = None
        # Streams whose last event went out (tests check a partial arrived before that).
        self.streams_finished = 0
        self.app = Starlette(
            routes=[
                Route("/v1/images/edits", self._edit, methods=["POST"]),
                Route("/v1/images/generations", self._generation, methods=["POST"]),
                Route("/v1/models", self._models, methods=["GET"]),
            ]
        )

    def reset(self) -> None:
        self.streams_finished = 0
        self.requests.clear()
        self.replies.clear()
        self.responder = None

    def enqueue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    @property
    def edits(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/images/edits")]

    @property
    def generations(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/images/generations")]

    async def _generation(self, request: Request) -> Response:
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        payload = json.loads(await request.body())
        # Kept as JSON values under `json`, and as text in fields for field_map() users.
        record.json = payload
        record.fields = [(name, str(value)) for name, value in payload.items()]
        return await self._reply(record, "image_generation", payload.get("stream") is True)

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
        fields = record.field_map()
        return await self._reply(record, "image_edit", fields.get("stream") == "true")

    async def _reply(self, record: RecordedRequest, prefix: str, stream: bool) -> Response:
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
        if stream and reply.status == 200 and reply.body is None:
            partials = int(record.field_map().get("partial_images", "0"))
            return StreamingResponse(
                self._events(reply, prefix, partials), media_type="text/event-stream"
            )
        if reply.body is None:
            fields = record.field_map()
            image = RESULTS.get(fields.get("output_format", ""), RESULT_PNG)
            body: Any = images_response(int(fields.get("n", "1")), image=image)
        else:
            body = reply.body
        if isinstance(body, bytes):
            return Response(body, status_code=reply.status, headers=reply.headers)
        return JSONResponse(body, status_code=reply.status, headers=reply.headers)

    async def _events(self, reply: Reply, prefix: str, partials: int) -> AsyncIterator[bytes]:
        image = base64.b64encode(RESULT_PNG).decode()
        shared = {
            "b64_json": image,
            "background": "opaque",
            "created_at": int(time.time()),
            "output_format": "png",
            "quality": "low",
            "size": "1024x1024",
        }
        events: list[dict[str, Any]] = [
            {**shared, "type": f"{prefix}.partial_image", "partial_image_index": index}
            for index in range(partials)
        ]
        usage = {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12}
        events.append({**shared, "type": f"{prefix}.completed", "usage": usage})
        for index, event in enumerate(events):
            if reply.stream_fail_after is not None and index == reply.stream_fail_after:
                if reply.stream_drop:
                    raise ConnectionAbortedError("fake upstream drops the connection mid-stream")
                error = {"message": "The fake upstream failed mid-stream.", "type": "server_error"}
                yield b"event: error\ndata: " + json.dumps({"error": error}).encode() + b"\n\n"
                self.streams_finished += 1
                return
            if index >= 1 and index - 1 < len(reply.stream_gates):
                await asyncio.to_thread(reply.stream_gates[index - 1].wait, reply.gate_timeout)
            head = f"event: {event['type']}\ndata: ".encode()
            yield head + json.dumps(event).encode() + b"\n\n"
        self.streams_finished += 1

    async def _models(self, request: Request) -> Response:
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.url.path,
                headers={k.lower(): v for k, v in request.headers.items()},
            )
        )
        return JSONResponse({"object": "list", "data": []})
