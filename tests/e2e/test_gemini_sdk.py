"""Acceptance for the `gemini` upstream (issue 16, acceptance 3): the real OpenAI SDK edits and
generates through the gateway, and a fake Gemini API on a real port sees generateContent JSON
(text + inline_data parts, imageConfig) and answers with Gemini's shapes."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fakes.gemini_upstream import (
    FakeGemini,
    GeminiReply,
    google_error,
    image_answer,
    result_png,
)
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.provider_gateways import GEMINI_KEYS, serve_provider_gateway
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

FLASH = "gemini-2.5-flash-image"
PRO = "gemini-3-pro-image-preview"
RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "30s"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def gemini_server() -> Iterator[FakeGemini]:
    fake = FakeGemini(keys=GEMINI_KEYS)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture
def gemini(gemini_server: FakeGemini) -> Iterator[FakeGemini]:
    gemini_server.reset()
    yield gemini_server
    gemini_server.reset()


@pytest.fixture
def gateway_url(gemini: FakeGemini, tmp_path: Path) -> Iterator[str]:
    # One gateway per test: key health (cooldowns, disabled keys) must not leak between tests.
    with serve_provider_gateway(
        tmp_path, azure_url="http://127.0.0.1:9", gemini_url=gemini.url
    ) as url:
        yield url


@pytest.fixture
def client(gateway_url: str) -> OpenAI:
    return sdk_client(gateway_url)


def decoded(result: openai.types.ImagesResponse) -> list[bytes]:
    return [base64.b64decode(item.b64_json or "") for item in result.data]


def test_gemini_edit_one_image(client: OpenAI, gemini: FakeGemini) -> None:
    source = images.png(64, 48)
    result = client.images.edit(
        image=("photo.png", source, "image/png"), prompt="a red hat", model=FLASH
    )
    (request,) = gemini.requests
    assert request.model == FLASH
    assert request.key in GEMINI_KEYS
    assert "authorization" not in request.headers
    assert request.body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "a red hat"},
                    {
                        "inline_data": {
                            "mime_type": "image/png",
                            "data": request.parts[1]["inline_data"]["data"],
                        }
                    },
                ],
            }
        ],
        # No size asked for: no imageConfig, so Gemini keeps the input's aspect ratio.
        "generationConfig": {"responseModalities": ["TEXT", "IMAGE"]},
    }
    assert request.image_shas == [sha(source)]
    assert decoded(result) == [result_png(1)]
    assert result.output_format == "png"
    usage = result.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (270, 1290, 1560)
    assert (usage.input_tokens_details.text_tokens, usage.input_tokens_details.image_tokens) == (
        12,
        258,
    )


def test_gemini_edit_several_images_with_size_and_image_size(
    client: OpenAI, gemini: FakeGemini
) -> None:
    sources = [images.png(64, 64), images.jpeg(80, 60), images.webp(40, 30)]
    client.images.edit(
        image=[
            ("a.png", sources[0], "image/png"),
            ("b.jpg", sources[1], "image/jpeg"),
            ("c.webp", sources[2], "image/webp"),
        ],
        prompt="put the hat from image 2 on the cat in image 1",
        model=PRO,
        size="1536x1024",
        extra_body={"image_size": "2K"},
    )
    (request,) = gemini.requests
    assert request.model == PRO
    assert [part["inline_data"]["mime_type"] for part in request.parts[1:]] == [
        "image/png",
        "image/jpeg",
        "image/webp",
    ]
    assert request.image_shas == [sha(source) for source in sources]
    assert request.body["generationConfig"]["imageConfig"] == {
        "aspectRatio": "3:2",
        "imageSize": "2K",
    }


def test_gemini_generation_n_images_are_n_calls(client: OpenAI, gemini: FakeGemini) -> None:
    result = client.images.generate(prompt="a lighthouse", model=FLASH, n=2, size="1792x1024")
    assert len(gemini.requests) == 2
    for request in gemini.requests:
        assert request.parts == [{"text": "a lighthouse"}]
        assert request.body["generationConfig"]["imageConfig"] == {"aspectRatio": "16:9"}
    assert sorted(decoded(result)) == sorted([result_png(1), result_png(2)])
    assert result.usage is not None and result.usage.output_tokens == 2 * 1290


def test_gemini_answer_as_a_hosted_url(
    client: OpenAI, gemini: FakeGemini, gateway_url: str
) -> None:
    result = client.images.generate(prompt="a fox", model=FLASH, response_format="url")
    url = result.data[0].url
    assert url is not None and url.startswith(gateway_url)
    hosted = httpx.get(url, headers={"authorization": f"Bearer {CLIENT_KEY}"})
    assert hosted.status_code == 200
    assert hosted.headers["content-type"] == "image/png"
    assert hosted.content == result_png(1)


def blocked_prompt() -> dict[str, Any]:
    return {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": {}}


def image_safety() -> dict[str, Any]:
    return {"candidates": [{"content": {"parts": []}, "finishReason": "IMAGE_SAFETY"}]}


def text_only() -> dict[str, Any]:
    answer = image_answer(b"")
    answer["candidates"][0]["content"]["parts"] = [{"text": "I can't draw that."}]
    answer["candidates"][0]["finishReason"] = "STOP"
    return answer


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (blocked_prompt(), "PROHIBITED_CONTENT"),
        (image_safety(), "IMAGE_SAFETY"),
        (text_only(), "STOP"),
    ],
    ids=["blockReason", "finishReason", "no-image"],
)
def test_gemini_safety_blocks_are_moderation_blocked(
    client: OpenAI, gemini: FakeGemini, answer: dict[str, Any], reason: str
) -> None:
    gemini.replies.append(GeminiReply(body=answer))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("a.png", images.png(), "image/png"), prompt="x", model=FLASH)
    assert caught.value.code == "moderation_blocked"
    assert reason in caught.value.message
    assert len(gemini.requests) == 1  # a refusal is billed once, never retried


def test_gemini_429_cools_the_key_and_the_next_request_uses_the_other(
    client: OpenAI, gemini: FakeGemini
) -> None:
    gemini.replies.append(
        GeminiReply(
            status=429,
            body=google_error(429, "RESOURCE_EXHAUSTED", "Quota exceeded.", RETRY_INFO),
        )
    )
    client.images.generate(prompt="first", model=FLASH)
    limited, retried = gemini.requests
    assert limited.key != retried.key
    client.images.generate(prompt="second", model=FLASH)
    assert gemini.requests[2].key == retried.key  # RetryInfo said 30 s


def test_gemini_invalid_argument_is_a_400_not_retried(client: OpenAI, gemini: FakeGemini) -> None:
    gemini.replies.append(
        GeminiReply(
            status=400,
            body=google_error(400, "INVALID_ARGUMENT", "Unable to process input image."),
        )
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("a.png", images.png(), "image/png"), prompt="x", model=FLASH)
    assert caught.value.code == "invalid_argument"
    assert "Unable to process input image" in caught.value.message
    assert len(gemini.requests) == 1


def test_gemini_refused_key_fails_over_and_5xx_is_retried_once(
    client: OpenAI, gemini: FakeGemini
) -> None:
    gemini.replies.append(
        GeminiReply(status=503, body=google_error(503, "UNAVAILABLE", "The model is overloaded."))
    )
    client.images.generate(prompt="x", model=FLASH)
    failed, retried = gemini.requests
    assert failed.key != retried.key
    gemini.reset()
    gemini.keys.discard(GEMINI_KEYS[0])
    try:
        for _ in range(2):  # the refused key is disabled, then only the other serves
            client.images.generate(prompt="y", model=FLASH)
    finally:
        gemini.keys.add(GEMINI_KEYS[0])
    assert [request.key for request in gemini.requests].count(GEMINI_KEYS[0]) <= 1
    assert gemini.requests[-1].key == GEMINI_KEYS[1]


def test_gemini_rules_refuse_before_anything_is_sent(client: OpenAI, gemini: FakeGemini) -> None:
    with pytest.raises(openai.BadRequestError) as mask:
        client.images.edit(
            image=("a.png", images.png(), "image/png"),
            mask=("m.png", images.mask_png(), "image/png"),
            prompt="x",
            model=FLASH,
        )
    with pytest.raises(openai.BadRequestError) as size:
        client.images.generate(prompt="x", model=PRO, extra_body={"image_size": "8K"})
    with pytest.raises(openai.BadRequestError) as too_many:
        client.images.edit(
            image=[("a.png", images.png(), "image/png")] * 4, prompt="x", model=FLASH
        )
    assert mask.value.body["param"] == "mask"  # type: ignore[index]
    assert size.value.body["param"] == "image_size"  # type: ignore[index]
    assert too_many.value.body["param"] == "image"  # type: ignore[index]
    assert gemini.requests == []


def test_gemini_keys_never_reach_an_answer_or_a_log(
    client: OpenAI, gemini: FakeGemini, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first, second = GEMINI_KEYS
    echoed = f"Key {first} (or {second[:6]}...{second[-10:]}) is not valid."
    gemini.replies.extend(
        [
            GeminiReply(status=400, body=google_error(400, "INVALID_ARGUMENT", echoed)),
            GeminiReply(
                status=429, body=google_error(429, "RESOURCE_EXHAUSTED", echoed, RETRY_INFO)
            ),
            GeminiReply(),
            # The one key not cooling fails; nothing is left to retry on.
            GeminiReply(status=500, body=google_error(500, "INTERNAL", echoed)),
        ]
    )
    seen: list[str] = []
    for prompt in ("invalid", "limited", "broken"):
        try:
            raw = client.images.with_raw_response.generate(prompt=prompt, model=FLASH)
            seen.append(f"{raw.http_response.headers} {raw.http_response.text}")
        except openai.APIStatusError as exc:
            seen.append(f"{exc.response.status_code} {exc.response.headers} {exc.response.text}")
    assert len(gemini.requests) == 4  # every scripted answer was served
    logged = "\n".join(caplog.handler.format(record) for record in caplog.records)
    assert any(record.name.startswith("gateway.") for record in caplog.records)
    for key in GEMINI_KEYS:
        for fragment in (key, key[-10:]):
            assert all(fragment not in text for text in seen)
            assert fragment not in logged
