"""Upstream failures reach the client as OpenAI-shaped errors with their own codes."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_env import gateway_env
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, serve_in_thread

PNG = images.png(64, 64)


def edit(client: OpenAI) -> object:
    return client.images.edit(image=("a.png", PNG, "image/png"), prompt="x")


def test_upstream_400_passes_through_unchanged(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(
        Reply(
            status=400,
            body={
                "error": {
                    "message": "Your request was rejected by the safety system.",
                    "type": "image_generation_user_error",
                    "param": None,
                    "code": "moderation_blocked",
                }
            },
        )
    )
    with pytest.raises(openai.BadRequestError) as caught:
        edit(client)
    assert caught.value.body == {
        "message": "Your request was rejected by the safety system.",
        "type": "image_generation_user_error",
        "param": None,
        "code": "moderation_blocked",
    }


def test_upstream_429_is_rate_limit_with_retry_after(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(
        Reply(
            status=429,
            body={"error": {"message": "Rate limit reached"}},
            headers={"retry-after": "7"},
        )
    )
    with pytest.raises(openai.RateLimitError) as caught:
        edit(client)
    assert caught.value.response.headers["retry-after"] == "7"


def test_upstream_401_is_502_not_the_clients_auth_error(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(Reply(status=401, body={"error": {"message": "bad key"}}))
    with pytest.raises(openai.InternalServerError) as caught:
        edit(client)
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_auth_failed"  # type: ignore[index]


def test_upstream_500_is_502(client: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    upstream.enqueue(Reply(status=500, body=b"<html>oops</html>"))
    with pytest.raises(openai.InternalServerError) as caught:
        edit(client)
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_error"  # type: ignore[index]


def test_upstream_bad_200_is_502(client: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    upstream.enqueue(Reply(status=200, body={"id": "chatcmpl-123", "object": "chat.completion"}))
    with pytest.raises(openai.InternalServerError) as caught:
        edit(client)
    assert caught.value.body["code"] == "upstream_bad_response"  # type: ignore[index]


def test_upstream_dropped_connection_is_502(client: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    upstream.enqueue(Reply(drop_connection=True))
    with pytest.raises(openai.InternalServerError) as caught:
        edit(client)
    assert caught.value.status_code in (500, 502)
    assert caught.value.body["code"] in ("upstream_connection_lost", "upstream_error")  # type: ignore[index]


@pytest.fixture(scope="module")
def short_timeout_gateway(
    fake_upstream: FakeOpenAIUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    config = write_gateway_config(
        tmp_path_factory.mktemp("timeouts"),
        upstreams={
            "default": {
                "type": "openai",
                "base_url": "http://unused",
                "keys_env": "GATEWAY_UPSTREAM_KEYS",
                "timeouts": {"connect": 2, "total": 1},
            }
        },
    )
    env = gateway_env(fake_upstream.url, GATEWAY_CONFIG=str(config))
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        yield url


def test_upstream_timeout_is_504_after_the_configured_total(
    short_timeout_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    upstream.enqueue(Reply(delay=3))
    client = sdk_client(short_timeout_gateway)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        edit(client)
    assert caught.value.status_code == 504
    assert caught.value.body["code"] == "upstream_timeout"  # type: ignore[index]
    assert time.monotonic() - started < 2.9  # the gateway gave up, not the fake
    assert len(upstream.edits) == 1


def test_upstream_unreachable_is_502(tmp_path: object) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    settings = load_settings(env=gateway_env(dead))
    with serve_in_thread(create_app(settings)) as url:
        client = sdk_client(url)
        with pytest.raises(openai.InternalServerError) as caught:
            edit(client)
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_unreachable"  # type: ignore[index]


def test_upstream_cookies_are_not_kept_between_requests(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    # One answer's Set-Cookie must not be sent back with later requests (other clients' too).
    upstream.enqueue(Reply(headers={"set-cookie": "affinity=node-7; Path=/"}), Reply())
    for _ in range(2):
        client.images.edit(image=("a.png", images.png()), prompt="x")
    assert [edit.headers.get("cookie") for edit in upstream.edits] == [None, None]
