"""Acceptance 1 (issue 10): `client.images.generate(...)` through the real SDK, for an
OpenAI-compatible upstream and a `bfl` upstream, through the same validation, keys and cache as
edits; plus streamed generations (relayed and emulated) and the demo's generations."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from app.main import create_app
from tests.e2e.test_cache_sdk import cached_settings, gateway, unique_prompt
from tests.fakes.bfl_upstream import FakeBflUpstream, result_png
from tests.fakes.openai_upstream import RESULT_PNG, FakeOpenAIUpstream, Reply
from tests.support.bfl_gateway import BFL_KEYS, serve_bfl_gateway
from tests.support.bfl_gateway import sdk as bfl_sdk
from tests.support.constants import CLIENT_KEY, UPSTREAM_KEYS
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread


def test_generation_sends_json_to_the_openai_upstream(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    result = client.images.generate(
        prompt="a lighthouse at dusk",
        model="gpt-image-1.5",
        size="1536x1024",
        quality="low",
        n=2,
        extra_body={"aspect_ratio": None},
    )
    assert [base64.b64decode(item.b64_json or "") for item in result.data] == [RESULT_PNG] * 2
    assert result.usage is not None and result.usage.total_tokens == 150
    (sent,) = upstream.generations
    assert upstream.edits == []
    assert sent.headers["content-type"] == "application/json"
    # Typed as JSON (n an integer), response_format stripped for GPT image models.
    assert sent.json == {
        "model": "gpt-image-1.5",
        "prompt": "a lighthouse at dusk",
        "size": "1536x1024",
        "quality": "low",
        "n": 2,
    }
    assert sent.key in UPSTREAM_KEYS


def test_generation_validated_by_the_catalog_before_the_upstream(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", model="gpt-image-1.5", size="999x999")
    assert caught.value.body["param"] == "size"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.images.generate(prompt="x", model="gpt-9-imaginary")
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="", model="gpt-image-1.5")
    assert caught.value.body["param"] == "prompt"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="x", extra_body={"image": "data:image/png;base64,AAAA"})
    assert caught.value.body["param"] == "image"  # type: ignore[index]
    assert upstream.requests == []


def test_generation_refuses_multipart_with_415(gateway_url: str) -> None:
    response = httpx.post(
        gateway_url + "/v1/images/generations",
        files={"prompt": (None, "x")},
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert response.status_code == 415
    assert response.json()["error"]["code"] == "unsupported_media_type"


def test_generation_upstream_rate_limit_is_answered_as_for_edits(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(
        Reply(status=429, body={"error": {"message": "slow down"}}, headers={"retry-after": "7"})
    )
    with pytest.raises(openai.RateLimitError) as caught:
        client.images.generate(prompt="a kite", model="gpt-image-1.5")
    assert caught.value.response.headers["retry-after"] == "7"
    (sent,) = upstream.generations
    assert sent.key in UPSTREAM_KEYS


def test_generation_key_pool_moves_past_a_rate_limited_key(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    # Two attempts allowed: a 429 on one key is retried on the other, as for edits.
    settings = cached_settings(fake_upstream, None, enabled=False)
    settings = settings.model_copy(
        update={"retry": settings.retry.model_copy(update={"max_attempts": 2})}
    )
    upstream.enqueue(Reply(status=429, body={"error": {"message": "slow down"}}))
    with gateway(settings) as url:
        result = sdk_client(url).images.generate(prompt="a kite", model="gpt-image-1.5")
    assert base64.b64decode(result.data[0].b64_json or "") == RESULT_PNG
    first, second = upstream.generations
    assert {first.key, second.key} == set(UPSTREAM_KEYS)


def test_generation_cache_hits_and_never_shares_an_entry_with_an_edit(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    prompt = unique_prompt()
    with gateway(cached_settings(fake_upstream, redis_url)) as url:
        cached = sdk_client(url)
        first = cached.images.with_raw_response.generate(prompt=prompt, model="gpt-image-1.5")
        second = cached.images.with_raw_response.generate(prompt=prompt, model="gpt-image-1.5")
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert second.parse().data[0].b64_json == first.parse().data[0].b64_json
        assert len(upstream.generations) == 1
        changed = cached.images.with_raw_response.generate(
            prompt=prompt, model="gpt-image-1.5", quality="high"
        )
        assert changed.headers["x-cache"] == "miss"
        # A streamed request for a cached generation: one completed event, no upstream call.
        events = list(cached.images.generate(prompt=prompt, model="gpt-image-1.5", stream=True))
    assert [event.type for event in events] == ["image_generation.completed"]
    assert base64.b64decode(events[0].b64_json) == RESULT_PNG
    assert len(upstream.generations) == 2


def test_generation_streams_partial_images_from_the_openai_upstream(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    stream = client.images.generate(
        prompt="a comet", model="gpt-image-1.5", stream=True, partial_images=1
    )
    events = list(stream)
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert base64.b64decode(events[-1].b64_json) == RESULT_PNG
    (sent,) = upstream.generations
    assert sent.json["stream"] is True and sent.json["partial_images"] == 1


@pytest.fixture
def bfl(tmp_path: Path) -> Iterator[tuple[FakeBflUpstream, OpenAI]]:
    fake = FakeBflUpstream(keys=BFL_KEYS)
    with serve_in_thread(fake.app) as bfl_url:
        fake.url = bfl_url
        with serve_bfl_gateway(tmp_path, bfl_url=bfl_url) as url:
            yield fake, bfl_sdk(url)


def test_generation_on_bfl_uses_text_to_image(bfl: tuple[FakeBflUpstream, OpenAI]) -> None:
    fake, flux = bfl
    result = flux.images.generate(
        prompt="a red fox in snow", model="flux-kontext-max", size="1792x1024", n=2
    )
    # The two tasks run side by side: which one BFL numbered first is theirs to decide.
    assert sorted(base64.b64decode(item.b64_json or "") for item in result.data) == sorted(
        [result_png(0), result_png(1)]
    )
    tasks = fake.submits
    assert [task.endpoint for task in tasks] == ["flux-kontext-max"] * 2
    for task in tasks:
        assert "input_image" not in task.body
        assert task.body["prompt"] == "a red fox in snow"
        assert task.body["aspect_ratio"] == "16:9"
        assert task.key in BFL_KEYS


def test_generation_on_bfl_streams_an_emulated_completed_event(
    bfl: tuple[FakeBflUpstream, OpenAI],
) -> None:
    fake, flux = bfl
    events = list(flux.images.generate(prompt="a fox", model="flux-kontext-pro", stream=True))
    assert [event.type for event in events] == ["image_generation.completed"]
    assert base64.b64decode(events[0].b64_json) == result_png(0)
    assert len(fake.submits) == 1


def test_generation_demo_is_deterministic_per_prompt(tmp_path: Path) -> None:
    from tests.support.gateway_env import gateway_settings

    settings = gateway_settings("http://127.0.0.1:9/v1").model_copy(update={"demo": True})
    with serve_in_thread(create_app(settings)) as url:
        demo = sdk_client(url)
        first = demo.images.generate(prompt="a blue whale", size="1024x1024")
        again = demo.images.generate(prompt="a blue whale", size="1024x1024")
        other = demo.images.generate(prompt="a green whale", size="1024x1024")
    assert first.data[0].b64_json == again.data[0].b64_json
    assert first.data[0].b64_json != other.data[0].b64_json
