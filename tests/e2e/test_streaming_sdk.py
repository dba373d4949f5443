"""Acceptance 2 (issue 10): streamed edits and generations through the real SDK. The fake
upstream holds each event after the first until the test releases it, so "the SDK yielded a
partial image before the upstream finished" is shown without timing."""

from __future__ import annotations

import base64
import threading

import pytest
from openai import APIError, OpenAI, RateLimitError

from tests.e2e.test_cache_sdk import cached_settings, gateway, unique_prompt
from tests.fakes.openai_upstream import RESULT_PNG, FakeOpenAIUpstream, Reply, images_response
from tests.support import images
from tests.support.sdk import sdk_client

PNG = images.png(32, 32)


def test_streaming_edit_yields_each_partial_before_the_upstream_finishes(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    gates = [threading.Event(), threading.Event()]
    upstream.enqueue(Reply(stream_gates=gates))
    seen: list[str] = []
    stream = client.images.edit(
        image=("a.png", PNG, "image/png"), prompt="a hat", stream=True, partial_images=2
    )
    for event in stream:
        seen.append(event.type)
        if event.type == "image_edit.partial_image":
            # The upstream is still waiting for us: nothing was buffered until it finished.
            assert upstream.streams_finished == 0
            assert event.partial_image_index == len(seen) - 1
            gates[len(seen) - 1].set()
        else:
            assert event.type == "image_edit.completed"
            assert base64.b64decode(event.b64_json) == RESULT_PNG
            assert event.usage.total_tokens == 12
    assert seen == [
        "image_edit.partial_image",
        "image_edit.partial_image",
        "image_edit.completed",
    ]
    (sent,) = upstream.edits
    assert sent.field_map()["stream"] == "true"
    assert sent.field_map()["partial_images"] == "2"


@pytest.mark.parametrize("drop", [False, True], ids=["error-event", "dropped-connection"])
def test_streaming_edit_failure_after_first_event_raises_api_error(
    client: OpenAI, upstream: FakeOpenAIUpstream, drop: bool
) -> None:
    upstream.enqueue(Reply(stream_fail_after=1, stream_drop=drop))
    seen: list[str] = []
    stream = client.images.edit(
        image=("a.png", PNG, "image/png"), prompt="a hat", stream=True, partial_images=2
    )
    with pytest.raises(APIError) as caught:
        for event in stream:
            seen.append(event.type)
    assert seen == ["image_edit.partial_image"]
    assert "mid-stream" in caught.value.message or "connection" in caught.value.message
    assert len(upstream.edits) == 1  # a stream that showed progress is never resent


def test_streaming_edit_refused_before_any_event_keeps_its_http_status(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(
        Reply(status=429, body={"error": {"message": "slow down"}}, headers={"retry-after": "7"})
    )
    with pytest.raises(RateLimitError) as caught:
        list(client.images.edit(image=("a.png", PNG, "image/png"), prompt="x", stream=True))
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "7"


def test_streaming_edit_from_an_upstream_that_ignores_stream_still_completes(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(Reply(body=images_response(1)))  # JSON, not SSE
    events = list(client.images.edit(image=("a.png", PNG, "image/png"), prompt="x", stream=True))
    assert [event.type for event in events] == ["image_edit.completed"]
    assert base64.b64decode(events[0].b64_json) == RESULT_PNG


def test_streamed_result_is_cached_as_the_final_image(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    prompt = unique_prompt()
    with gateway(cached_settings(fake_upstream, redis_url)) as url:
        cached = sdk_client(url)
        streamed = list(
            cached.images.edit(
                image=("a.png", PNG, "image/png"), prompt=prompt, stream=True, partial_images=1
            )
        )
        assert [event.type for event in streamed] == [
            "image_edit.partial_image",
            "image_edit.completed",
        ]
        raw = cached.images.with_raw_response.edit(image=("a.png", PNG, "image/png"), prompt=prompt)
        again = list(
            cached.images.edit(image=("a.png", PNG, "image/png"), prompt=prompt, stream=True)
        )
    assert raw.headers["x-cache"] == "hit"
    assert base64.b64decode(raw.parse().data[0].b64_json or "") == RESULT_PNG
    assert [event.type for event in again] == ["image_edit.completed"]
    assert len(upstream.edits) == 1
