"""A fake Azure OpenAI resource on a real port, checking requests the way Azure's image API
documents them: the key in `api-key` (never `Authorization`), `api-version` on the deployments
form, a known deployment, multipart edits with PNG or JPEG images, JSON generations. Records every
request; answers as scripted (Azure's 429 and content-filter shapes among them).

Shapes from learn.microsoft.com (MicrosoftDocs/azure-ai-docs): how-to/dall-e.md (edits and
generations, `contentFilter`), concepts/content-filter.md (400 `content_filter`),
api-version-lifecycle.md (the v1 form).
"""

from __future__ import annotations

import base64
import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.fakes.openai_upstream import RESULT_PNG, RecordedFile

# The image edit API takes PNG or JPEG input (how-to/dall-e.md).
_IMAGE_TYPES = ("image/png", "image/jpeg")


@dataclass
class AzureRequest:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    fields: dict[str, str] = field(default_factory=dict)
    files: list[RecordedFile] = field(default_factory=list)
    json: Any = None

    @property
    def key(self) -> str | None:
        return self.headers.get("api-key")


@dataclass
class AzureReply:
    status: int = 200
    body: Any = None  # None: an ImagesResponse of n images
    headers: dict[str, str] = field(default_factory=dict)


def azure_error(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


def images_body(n: int) -> dict[str, Any]:
    image = base64.b64encode(RESULT_PNG).decode("ascii")
    return {
        "created": 1698116662,
        "data": [{"b64_json": image} for _ in range(n)],
        "usage": {
            "input_tokens": 40,
            "output_tokens": 272,
            "total_tokens": 312,
            "input_tokens_details": {"text_tokens": 10, "image_tokens": 30},
        },
    }


class FakeAzureOpenAI:
    def __init__(self, keys: tuple[str, ...], deployments: tuple[str, ...]) -> None:
        self.keys = set(keys)
        self.deployments = set(deployments)
        self.url = ""
        self.requests: list[AzureRequest] = []
        self.replies: deque[AzureReply] = deque()
        self.app = Starlette(
            routes=[
                Route(
                    "/openai/deployments/{deployment}/images/{call}",
                    self._deployment_call,
                    methods=["POST"],
                ),
                Route("/openai/v1/images/{call}", self._v1_call, methods=["POST"]),
                Route("/openai/models", self._models, methods=["GET"]),
                Route("/openai/v1/models", self._models, methods=["GET"]),
            ]
        )

    def reset(self) -> None:
        self.requests.clear()
        self.replies.clear()

    async def _deployment_call(self, request: Request) -> Response:
        if "api-version" not in request.query_params:
            return JSONResponse(
                azure_error(
                    "MissingApiVersionParameter",
                    "The api-version query parameter (?api-version=) is required for all requests.",
                ),
                status_code=400,
            )
        return await self._call(request, request.path_params["deployment"])

    async def _v1_call(self, request: Request) -> Response:
        return await self._call(request, None)

    async def _models(self, request: Request) -> Response:
        refused = self._refused_key(request)
        return refused or JSONResponse({"object": "list", "data": []})

    def _refused_key(self, request: Request) -> Response | None:
        if "authorization" in request.headers:
            return JSONResponse(azure_error("400", "Send the key as api-key."), status_code=400)
        if request.headers.get("api-key") not in self.keys:
            return JSONResponse(
                azure_error(
                    "401",
                    "Access denied due to invalid subscription key or wrong API endpoint.",
                ),
                status_code=401,
            )
        return None

    async def _call(self, request: Request, deployment: str | None) -> Response:
        call = request.path_params["call"]
        record = AzureRequest(
            path=request.url.path,
            query=dict(request.query_params),
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        self.requests.append(record)
        refused = self._refused_key(request)
        if refused is not None:
            return refused
        problem = await self._read(request, call, record)
        if problem is not None:
            return JSONResponse(azure_error("invalid_request", problem), status_code=400)
        # The v1 form names the deployment in the body's `model`.
        deployment = deployment or record.fields.get("model")
        if deployment not in self.deployments:
            return JSONResponse(
                azure_error(
                    "DeploymentNotFound",
                    "The API deployment for this resource does not exist.",
                ),
                status_code=404,
            )
        if self.replies:
            reply = self.replies.popleft()
            if reply.body is not None or reply.status != 200:
                return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
        return JSONResponse(images_body(int(record.fields.get("n", "1"))))

    async def _read(self, request: Request, call: str, record: AzureRequest) -> str | None:
        """What is wrong with the body for `call`, or None (the body recorded)."""
        content_type = request.headers.get("content-type", "")
        if call == "generations":
            if not content_type.startswith("application/json"):
                return "Generations take a JSON body."
            record.json = json.loads(await request.body())
            record.fields = {k: str(v) for k, v in record.json.items()}
        elif call == "edits":
            if not content_type.startswith("multipart/form-data"):
                return "The image edit API takes multipart/form-data."
            async with request.form(max_files=32) as form:
                for name, value in form.multi_items():
                    if isinstance(value, UploadFile):
                        data = await value.read()
                        record.files.append(
                            RecordedFile(name, value.filename, value.content_type, data)
                        )
                    else:
                        record.fields[name] = value
            images = [f for f in record.files if f.field in ("image", "image[]")]
            if not images:
                return "An image is required."
            for upload in images:
                if upload.content_type not in _IMAGE_TYPES:
                    return "The input image must be a PNG or JPG file."
        else:
            return f"Unknown images call {call!r}."
        if not record.fields.get("prompt"):
            return "A prompt is required."
        return None
