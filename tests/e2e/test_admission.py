"""Acceptance: beyond `limits.max_in_flight` the gateway answers 503 with retry-after in OpenAI's
envelope, keeps health endpoints answering, and frees each slot when its request ends."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.gateway_env import gateway_settings
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread


@pytest.fixture
def limited_gateway(upstream: FakeOpenAIUpstream) -> Iterator[str]:
    settings = gateway_settings(upstream.url)
    limits = settings.limits.model_copy(update={"max_in_flight": 2, "overload_retry_after": 3})
    with serve_in_thread(create_app(settings.model_copy(update={"limits": limits}))) as url:
        yield url


def _wait_for_edits(upstream: FakeOpenAIUpstream, count: int) -> None:
    deadline = time.monotonic() + 20
    while len(upstream.edits) < count:
        assert time.monotonic() < deadline, "the held requests never reached the upstream"
        time.sleep(0.01)


def test_admission_refuses_beyond_limit_with_503_and_retry_after(
    limited_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    # Two edits held upstream fill both slots; the third must be refused, not queued.
    upstream.enqueue(Reply(delay=1.0), Reply(delay=1.0))
    held: list[object] = []

    def edit() -> None:
        held.append(sdk_client(limited_gateway).images.edit(image=images.png(), prompt="held"))

    threads = [threading.Thread(target=edit) for _ in range(2)]
    for thread in threads:
        thread.start()
    _wait_for_edits(upstream, 2)

    with pytest.raises(openai.InternalServerError) as refused:
        sdk_client(limited_gateway).images.edit(image=images.png(), prompt="one too many")
    response = refused.value.response
    assert response.status_code == 503
    assert response.headers["retry-after"] == "3"
    assert response.headers["retry-after-ms"] == "3000"
    assert response.headers["x-request-id"].startswith("req_")
    assert response.json() == {
        "error": {
            "message": "The gateway is at its limit of requests in flight; retry after 3 s.",
            "type": "server_error",
            "param": None,
            "code": "gateway_overloaded",
        }
    }
    # Health stays reachable while full; the refused edit never reached the upstream.
    assert httpx.get(limited_gateway + "/healthz").status_code == 200
    assert httpx.get(limited_gateway + "/readyz").status_code == 200
    assert len(upstream.edits) == 2

    for thread in threads:
        thread.join(timeout=30)
    assert len(held) == 2
    # Both slots are free again.
    result = sdk_client(limited_gateway).images.edit(image=images.png(), prompt="after")
    assert result.data


def test_admission_frees_slots_of_failed_requests(
    limited_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    sdk = sdk_client(limited_gateway)
    for _ in range(3):
        with pytest.raises(openai.BadRequestError):
            sdk.images.edit(image=b"not an image", prompt="x")
    upstream.enqueue(Reply(status=500, body={"error": {"message": "boom"}}))
    upstream.enqueue(Reply(status=500, body={"error": {"message": "boom"}}))
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as failed:
            sdk.images.edit(image=images.png(), prompt="x")
        assert failed.value.status_code == 502
    assert sdk.images.edit(image=images.png(), prompt="x").data
    assert sdk.images.edit(image=images.png(), prompt="x").data


def test_admission_counts_only_authenticated_requests(
    limited_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(Reply(delay=1.0), Reply(delay=1.0))
    threads = [
        threading.Thread(
            target=lambda: sdk_client(limited_gateway).images.edit(
                image=images.png(), prompt="held"
            )
        )
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    _wait_for_edits(upstream, 2)
    # With the gateway full, a client without a valid key still learns that first.
    anonymous = httpx.post(limited_gateway + "/v1/images/edits", files={"image": b"x"})
    assert anonymous.status_code == 401
    for thread in threads:
        thread.join(timeout=30)
