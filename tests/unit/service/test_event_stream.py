"""Unit: the SSE answer of a streaming request, and the request fields that decide it."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import orjson
import pytest

from app.cache.fingerprint import fingerprint
from app.errors import UpstreamFailed
from app.intake.form import IntakeForm, TextField
from app.intake.validation import validate_generation
from app.service.streaming import event_stream
from app.upstream.base import PartialSink
from tests.support.gateway_env import gateway_settings
from tests.unit.cache.builders import edit


def generation(**fields: str) -> Any:
    catalog = gateway_settings("http://127.0.0.1:9/v1").catalog
    form = IntakeForm(fields=[TextField(name, value) for name, value in fields.items()])
    return validate_generation(form, catalog, default_model="gpt-image-1.5")


def collect(stream: Any) -> list[bytes]:
    async def run() -> list[bytes]:
        return [chunk async for chunk in stream]

    return asyncio.run(run())


def test_fingerprint_of_a_generation_differs_from_an_edit_with_the_same_fields() -> None:
    made = edit({"prompt": "x"})
    assert fingerprint(made) != fingerprint(replace(made, operation="generation"))
    # Streaming shapes the answer only: a streamed request shares the entry.
    assert fingerprint(made) == fingerprint(replace(made, stream=True, partial_images=2))


def test_generation_stream_fields_are_kept_out_of_params() -> None:
    request = generation(prompt="x", stream="true", partial_images="3")
    assert (request.stream, request.partial_images) == (True, 3)
    assert "stream" not in request.params and "partial_images" not in request.params
    assert request.event_prefix == "image_generation"


def test_event_stream_relays_partials_keeps_alive_then_completes() -> None:
    request = generation(prompt="x", stream="true", partial_images="1")
    finished: list[bool] = []

    async def produce(on_partial: PartialSink) -> dict[str, Any]:
        on_partial({"type": "image_generation.partial_image", "b64_json": "AAAA"})
        await asyncio.sleep(0.2)  # nothing arrives meanwhile: keep-alive comments go out
        return {"created": 7, "data": [{"b64_json": "QkJC"}], "output_format": "png"}

    async def finish() -> None:
        finished.append(True)

    chunks = collect(
        event_stream(request, produce, redact=str, finish=finish, keepalive_seconds=0.02)
    )
    assert chunks[0].startswith(b"event: image_generation.partial_image\ndata: ")
    assert b": keep-alive\n\n" in chunks
    completed = chunks[-1]
    assert completed.startswith(b"event: image_generation.completed\ndata: ")
    event = orjson.loads(completed.split(b"data: ", 1)[1])
    assert event["b64_json"] == "QkJC" and event["created_at"] == 7
    assert event["usage"]["input_tokens_details"] == {"text_tokens": 0, "image_tokens": 0}
    assert finished == [True]


@pytest.mark.parametrize("secret", ["sk-live-SECRET-0123456789"])
def test_event_stream_turns_a_failure_into_one_redacted_error_event(secret: str) -> None:
    request = generation(prompt="x", stream="true")

    async def produce(on_partial: PartialSink) -> dict[str, Any]:
        raise UpstreamFailed(f"boom with {secret}")

    async def finish() -> None:
        return None

    chunks = collect(
        event_stream(
            request,
            produce,
            redact=lambda text: text.replace(secret, "[redacted]"),
            finish=finish,
        )
    )
    assert len(chunks) == 1 and chunks[0].startswith(b"event: error\ndata: ")
    body = orjson.loads(chunks[0].split(b"data: ", 1)[1])
    assert body["error"]["message"] == "boom with [redacted]"
    assert secret.encode() not in chunks[0]
