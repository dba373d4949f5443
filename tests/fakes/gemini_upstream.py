"""A fake Gemini API on a real port: `POST /v1beta/models/{model}:generateContent` checking the
`x-goog-api-key` header and the JSON structure Google's reference gives (contents -> parts of
text and inline_data, generationConfig.responseModalities and imageConfig), answering with inline
image parts and usageMetadata, or Google's error shapes (INVALID_ARGUMENT, API_KEY_INVALID,
RESOURCE_EXHAUSTED with RetryInfo). Records every request.

Shapes from ai.google.dev (gemini-api/docs/nanobanana, api/generate-content,
gemini-api/docs/troubleshooting) and googleapis/python-genai (types.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support import images

MODELS = ("gemini-2.5-flash-image", "gemini-3-pro-image-preview")
ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_SIZES = ("1K", "2K", "4K")
_INPUT_TYPES = ("image/png", "image/jpeg", "image/webp", "image/heic", "image/heif")
_REQUEST_FIELDS = {"contents", "generationConfig", "safetySettings", "systemInstruction"}
_GENERATION_FIELDS = {"responseModalities", "imageConfig", "candidateCount", "temperature"}


@dataclass
class GeminiRequest:
    model: str
    key: str | None
    headers: dict[str, str]
    body: Any

    @property
    def parts(self) -> list[dict[str, Any]]:
        return list(self.body["contents"][0]["parts"])

    @property
    def image_shas(self) -> list[str]:
        return [
            hashlib.sha256(base64.b64decode(part["inline_data"]["data"])).hexdigest()
            for part in self.parts
            if "inline_data" in part
        ]


@dataclass
class GeminiReply:
    status: int = 200
    body: Any = None  # None: an answer with one image
    headers: dict[str, str] = field(default_factory=dict)


def result_png(index: int) -> bytes:
    return images.png(8, 8, colour=(30, (50 * index + 40) % 256, 200))


def google_error(code: int, status: str, message: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status, "details": list(details)}}


def image_answer(png: bytes) -> dict[str, Any]:
    return {
        "candidates": [
            {
                "content": {
                    "role": "model",
                    "parts": [
                        {"text": "Here is the edited image."},
                        {
                            "inlineData": {
                                "mimeType": "image/png",
                                "data": base64.b64encode(png).decode("ascii"),
                            }
                        },
                    ],
                },
                "finishReason": "STOP",
                "index": 0,
            }
        ],
        "usageMetadata": {
            "promptTokenCount": 270,
            "candidatesTokenCount": 1290,
            "totalTokenCount": 1560,
            "promptTokensDetails": [
                {"modality": "TEXT", "tokenCount": 12},
                {"modality": "IMAGE", "tokenCount": 258},
            ],
            "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}],
        },
        "modelVersion": "gemini-2.5-flash-image",
    }


class FakeGemini:
    def __init__(self, keys: tuple[str, ...]) -> None:
        self.keys = set(keys)
        self.url = ""
        self.requests: list[GeminiRequest] = []
        self.replies: deque[GeminiReply] = deque()
        self.served = 0
        self.app = Starlette(
            routes=[
                Route("/v1beta/models", self._models, methods=["GET"]),
                Route("/v1beta/models/{target}", self._generate, methods=["POST"]),
            ]
        )

    def reset(self) -> None:
        self.requests.clear()
        self.replies.clear()
        self.served = 0

    def _key_refused(self, request: Request) -> Response | None:
        if request.headers.get("x-goog-api-key") in self.keys:
            return None
        return JSONResponse(
            google_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                },
            ),
            status_code=400,
        )

    async def _models(self, request: Request) -> Response:
        return self._key_refused(request) or JSONResponse({"models": []})

    async def _generate(self, request: Request) -> Response:
        model, _, method = request.path_params["target"].partition(":")
        if method != "generateContent" or model not in MODELS:
            return JSONResponse(
                google_error(404, "NOT_FOUND", f"models/{model} is not found."), status_code=404
            )
        body = await request.json()
        self.requests.append(
            GeminiRequest(
                model=model,
                key=request.headers.get("x-goog-api-key"),
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
            )
        )
        refused = self._key_refused(request)
        if refused is not None:
            return refused
        problem = structure_problem(body)
        if problem is not None:
            return JSONResponse(google_error(400, "INVALID_ARGUMENT", problem), status_code=400)
        if self.replies:
            reply = self.replies.popleft()
            if reply.body is not None or reply.status != 200:
                return JSONResponse(reply.body, status_code=reply.status, headers=reply.headers)
        self.served += 1
        return JSONResponse(image_answer(result_png(self.served)))


def structure_problem(body: Any) -> str | None:
    """What Gemini would refuse in a generateContent body, or None."""
    if not isinstance(body, dict):
        return "Invalid JSON payload received."
    unknown = set(body) - _REQUEST_FIELDS
    if unknown:
        return f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r}."
    contents = body.get("contents")
    if not isinstance(contents, list) or len(contents) != 1:
        return "contents: one user turn expected"
    turn = contents[0]
    if turn.get("role") not in (None, "user") or not isinstance(turn.get("parts"), list):
        return "contents[0]: a user turn with parts expected"
    parts = turn["parts"]
    if not parts or not isinstance(parts[0].get("text"), str) or not parts[0]["text"]:
        return "contents[0].parts[0]: the text prompt expected first"
    for position, part in enumerate(parts[1:], start=1):
        inline = part.get("inline_data")
        if set(part) != {"inline_data"} or not isinstance(inline, dict):
            return f"contents[0].parts[{position}]: an inline_data part expected"
        if inline.get("mime_type") not in _INPUT_TYPES:
            return f"contents[0].parts[{position}].inline_data.mime_type: unsupported"
        try:
            base64.b64decode(inline.get("data", ""), validate=True)
        except (binascii.Error, ValueError):
            return f"contents[0].parts[{position}].inline_data.data: not base64"
    config = body.get("generationConfig", {})
    if set(config) - _GENERATION_FIELDS:
        return "generationConfig: unknown field"
    if "IMAGE" not in config.get("responseModalities", ["TEXT", "IMAGE"]):
        return "generationConfig.responseModalities: IMAGE expected for an image model"
    image_config = config.get("imageConfig", {})
    if set(image_config) - {"aspectRatio", "imageSize"}:
        return "generationConfig.imageConfig: unknown field"
    if image_config.get("aspectRatio", "1:1") not in ASPECT_RATIOS:
        return "generationConfig.imageConfig.aspectRatio: unsupported"
    if image_config.get("imageSize", "1K") not in IMAGE_SIZES:
        return "generationConfig.imageConfig.imageSize: unsupported"
    return None
