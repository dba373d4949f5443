"""The gemini dialect on its own: the generateContent body it builds, how answers become an
ImagesResponse with usage, and how Gemini's error statuses become the gateway's failures."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from pydantic import SecretStr

from app.config.catalog import Catalog
from app.config.settings import Settings
from app.config.yaml_source import ConfigError
from app.errors import GatewayError
from app.intake.request import EditRequest, ImageInput
from app.intake.sniff import HEAD_BYTES, TAIL_BYTES, sniff_image
from app.intake.spool import SpooledUpload
from app.observability.redaction import Redactor
from app.upstream.base import UpstreamAnswer, UpstreamKey
from app.upstream.gemini import (
    GeminiUpstream,
    answer_image,
    check_catalog,
    images_response,
    request_body,
    retry_delay,
    usage_of,
)
from tests.fakes.gemini_upstream import image_answer, structure_problem
from tests.support import images
from tests.support.provider_gateways import GEMINI_KEYS, provider_settings, write_provider_config

KEY = UpstreamKey(id="gemini#1", secret=SecretStr(GEMINI_KEYS[0]))
PRO = "gemini-3-pro-image-preview"


def settings_in(tmp_path: Path) -> Settings:
    return provider_settings(
        write_provider_config(
            tmp_path, azure_url="http://127.0.0.1:9", gemini_url="https://gemini.test"
        )
    )


def upload_of(data: bytes) -> ImageInput:
    upload = SpooledUpload("image", None, threshold=1 << 20, spool_dir=None)
    upload.write(data)
    info = sniff_image(upload.head(HEAD_BYTES), upload.tail(TAIL_BYTES), upload.size)
    return ImageInput(upload=upload, info=info, param="image")


def edit_of(settings: Settings, *sources: bytes, **params: str | int) -> EditRequest:
    return EditRequest(
        model=settings.catalog.models[PRO],
        prompt="make it blue",
        images=tuple(upload_of(source) for source in sources),
        mask=None,
        params=dict(params),
        extra_fields=(("unknown_field", "x"),),
        response_format=None,
        n=1,
    )


def test_request_body_is_text_then_inline_images_then_image_config(tmp_path: Path) -> None:
    png, jpeg = images.png(16, 16), images.jpeg(16, 16)
    body = orjson.loads(
        request_body(
            edit_of(settings_in(tmp_path), png, jpeg, aspect_ratio="16:9", image_size="4K"),
            ("IMAGE",),
        )
    )
    assert body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "make it blue"},
                    {
                        "inline_data": {
                            "mime_type": "image/png",
                            "data": base64.b64encode(png).decode(),
                        }
                    },
                    {
                        "inline_data": {
                            "mime_type": "image/jpeg",
                            "data": base64.b64encode(jpeg).decode(),
                        }
                    },
                ],
            }
        ],
        "generationConfig": {
            "responseModalities": ["IMAGE"],
            "imageConfig": {"aspectRatio": "16:9", "imageSize": "4K"},
        },
    }
    # What Gemini's reference accepts (the fake checks it the same way).
    assert structure_problem(body) is None


def test_request_body_without_image_settings_has_no_image_config(tmp_path: Path) -> None:
    body = orjson.loads(request_body(edit_of(settings_in(tmp_path)), ("TEXT", "IMAGE")))
    assert body["generationConfig"] == {"responseModalities": ["TEXT", "IMAGE"]}
    assert body["contents"][0]["parts"] == [{"text": "make it blue"}]


def test_answer_image_skips_thought_images_and_reads_either_spelling() -> None:
    answer = image_answer(b"final")
    parts = answer["candidates"][0]["content"]["parts"]
    parts.insert(
        0, {"inlineData": {"mimeType": "image/png", "data": "dGhvdWdodA=="}, "thought": True}
    )
    assert answer_image(answer) == (base64.b64encode(b"final").decode(), "image/png")
    snake = {
        "candidates": [
            {"content": {"parts": [{"inline_data": {"mime_type": "image/jpeg", "data": "QQ=="}}]}}
        ]
    }
    assert answer_image(snake) == ("QQ==", "image/jpeg")


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        ({"promptFeedback": {"blockReason": "SAFETY"}}, "prompt was blocked (SAFETY)"),
        ({"candidates": [{"finishReason": "PROHIBITED_CONTENT"}]}, "(PROHIBITED_CONTENT)"),
        (
            {
                "candidates": [
                    {"content": {"parts": [{"text": "no"}]}, "finishReason": "IMAGE_SAFETY"}
                ]
            },
            "(IMAGE_SAFETY)",
        ),
        (
            {"candidates": [{"content": {"parts": [{"text": "no"}]}, "finishReason": "STOP"}]},
            "without an image (STOP)",
        ),
        ({}, "without an image (no candidates)"),
        ({"candidates": [{"finishReason": "<script>"}]}, "(unspecified)"),
    ],
)
def test_answer_without_an_image_is_moderation_blocked(answer: dict[str, Any], words: str) -> None:
    with pytest.raises(GatewayError) as caught:
        answer_image(answer)
    assert (caught.value.status_code, caught.value.code, caught.value.failure) == (
        400,
        "moderation_blocked",
        "rejected",
    )
    assert words in caught.value.message


def test_usage_is_summed_into_openai_shape_with_thinking_as_output() -> None:
    first = image_answer(b"a")["usageMetadata"]
    second = {**first, "thoughtsTokenCount": 100, "totalTokenCount": 1660}
    assert usage_of([first, second, None]) == {
        "input_tokens": 540,
        "output_tokens": 2 * 1290 + 100,
        "total_tokens": 1560 + 1660,
        "input_tokens_details": {"text_tokens": 24, "image_tokens": 516},
        "output_tokens_details": {"text_tokens": 0, "image_tokens": 2580},
    }
    assert usage_of([None]) is None


def test_images_response_has_one_item_per_answer() -> None:
    body = images_response([image_answer(b"one"), image_answer(b"two")])
    assert [base64.b64decode(item["b64_json"]) for item in body["data"]] == [b"one", b"two"]
    assert body["output_format"] == "png"
    assert body["usage"]["output_tokens"] == 2580


@pytest.mark.parametrize(
    ("delay", "seconds"),
    [
        ("30s", 30.0),
        ("1.5s", 1.5),
        ("0.000001s", 0.000001),
        ("30", None),
        ("-1s", None),
        (None, None),
    ],
)
def test_retry_delay_reads_retry_info(delay: str | None, seconds: float | None) -> None:
    detail: dict[str, Any] = {"@type": "type.googleapis.com/google.rpc.RetryInfo"}
    if delay is not None:
        detail["retryDelay"] = delay
    assert retry_delay([{"@type": "other"}, detail]) == seconds


def gemini_call(
    tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response]
) -> tuple[UpstreamAnswer | GatewayError, list[httpx.Request]]:
    settings = settings_in(tmp_path)
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    async def go() -> UpstreamAnswer | GatewayError:
        async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
            upstream = GeminiUpstream(
                "gemini", settings.upstreams["gemini"], client, Redactor(GEMINI_KEYS)
            )
            try:
                return await upstream.edit(edit_of(settings, images.png(8, 8)), KEY)
            except GatewayError as exc:
                return exc

    return asyncio.run(go()), seen


def google_error(code: int, status: str, *details: dict[str, Any]) -> dict[str, Any]:
    return {
        "error": {
            "code": code,
            "message": f"m {GEMINI_KEYS[0]}",
            "status": status,
            "details": list(details),
        }
    }


def test_gemini_call_goes_to_generate_content_with_the_key_header(tmp_path: Path) -> None:
    answer, (request,) = gemini_call(
        tmp_path, lambda _: httpx.Response(200, json=image_answer(b"x"))
    )
    assert isinstance(answer, UpstreamAnswer)
    assert str(request.url) == f"https://gemini.test/v1beta/models/{PRO}:generateContent"
    assert request.headers["x-goog-api-key"] == GEMINI_KEYS[0]
    assert "authorization" not in request.headers
    assert b"unknown_field" not in request.content  # Gemini refuses fields it does not know


def test_gemini_failures_map_to_the_pools_kinds(tmp_path: Path) -> None:
    retry_info = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12.5s"}
    limited, _ = gemini_call(
        tmp_path,
        lambda _: httpx.Response(429, json=google_error(429, "RESOURCE_EXHAUSTED", retry_info)),
    )
    assert isinstance(limited, GatewayError) and limited.failure == "rate_limited"
    assert limited.upstream_headers == {"retry-after": "12.5"}
    assert limited.headers == {"retry-after": "13"}
    assert GEMINI_KEYS[0] not in limited.message

    bad_key = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID"}
    cases = [
        (400, "INVALID_ARGUMENT", (bad_key,), "auth", 502),
        (403, "PERMISSION_DENIED", (), "auth", 502),
        (400, "FAILED_PRECONDITION", (), "quota", 502),
        (400, "INVALID_ARGUMENT", (), "rejected", 400),
        (404, "NOT_FOUND", (), "rejected", 404),
        (500, "INTERNAL", (), "server", 502),
        (503, "UNAVAILABLE", (), "server", 502),
    ]
    for status, name, details, failure, answered in cases:
        error, _ = gemini_call(
            tmp_path,
            lambda _, s=status, n=name, d=details: httpx.Response(s, json=google_error(s, n, *d)),
        )
        assert isinstance(error, GatewayError), name
        assert (error.failure, error.status_code) == (failure, answered), name
        assert GEMINI_KEYS[0] not in error.message
    invalid, _ = gemini_call(
        tmp_path, lambda _: httpx.Response(400, json=google_error(400, "INVALID_ARGUMENT"))
    )
    assert isinstance(invalid, GatewayError) and invalid.code == "invalid_argument"
    garbled, _ = gemini_call(tmp_path, lambda _: httpx.Response(200, content=b"<html>"))
    assert isinstance(garbled, GatewayError) and garbled.failure == "bad_response"


def test_check_catalog_refuses_a_mask_for_a_gemini_model(tmp_path: Path) -> None:
    catalog = settings_in(tmp_path).catalog
    check_catalog(catalog, "gemini")
    models = dict(catalog.models)
    models[PRO] = models[PRO].model_copy(
        update={"mask": models[PRO].mask.model_copy(update={"allowed": True})}
    )
    with pytest.raises(ConfigError, match=f"models.{PRO}.mask.allowed"):
        check_catalog(Catalog(models=models), "gemini")


def test_startup_refuses_modalities_without_images(tmp_path: Path) -> None:
    path = write_provider_config(
        tmp_path, azure_url="http://127.0.0.1:9", gemini_url="https://gemini.test"
    )
    text = path.read_text().replace(
        "type: gemini", "type: gemini\n    gemini: {response_modalities: [TEXT]}"
    )
    path.write_text(text)
    with pytest.raises(ConfigError, match="response_modalities"):
        provider_settings(path)
