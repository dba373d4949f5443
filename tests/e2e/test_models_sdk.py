"""Acceptance (issue 16): `client.models.retrieve(...)` answers as OpenAI does, 404 in OpenAI's
envelope for an id the catalog lacks or the calling client may not use (as the listing hides it).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support.gateway_config import write_gateway_config
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread


def test_retrieve_a_catalog_model(client: OpenAI) -> None:
    model = client.models.retrieve("gpt-image-2")
    assert (model.id, model.object, model.owned_by) == ("gpt-image-2", "model", "openai")
    assert isinstance(model.created, int)


def test_retrieve_an_unknown_model_is_not_found(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-image-9")
    error = caught.value.body
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert caught.value.request_id  # x-request-id, as on every answer


@pytest.fixture
def restricted(tmp_path: Path, fake_upstream: FakeOpenAIUpstream) -> Iterator[tuple[str, str]]:
    key = "igw-art-" + secrets.token_hex(16)
    config = write_gateway_config(
        tmp_path,
        clients={"named": {"art": {"keys_env": "GW_TEST_ART_KEYS", "models": ["gpt-image-2"]}}},
    )
    settings = load_settings(
        env={
            "GATEWAY_CONFIG": str(config),
            "GATEWAY_UPSTREAM_URL": fake_upstream.url,
            "GATEWAY_UPSTREAM_KEYS": "sk-test-" + secrets.token_hex(8),
            "GW_TEST_ART_KEYS": key,
        }
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url, key


def test_retrieve_agrees_with_the_listing_for_a_restricted_client(
    restricted: tuple[str, str],
) -> None:
    url, key = restricted
    client = sdk_client(url, key=key)
    assert [model.id for model in client.models.list()] == ["gpt-image-2"]
    assert client.models.retrieve("gpt-image-2").id == "gpt-image-2"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1.5")
