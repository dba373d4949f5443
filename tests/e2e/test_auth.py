"""Acceptance: a missing or wrong client key gets 401 AuthenticationError; no upstream key ever
appears in a response body or header."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fakes.openai_upstream import FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.constants import CLIENT_KEY, UPSTREAM_KEYS
from tests.support.sdk import sdk_client

PNG = images.png(64, 64)


def test_auth_wrong_key_is_authentication_error(
    gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    client = sdk_client(gateway_url, key="igw-wrong")
    with pytest.raises(openai.AuthenticationError) as caught:
        client.images.edit(image=("a.png", PNG, "image/png"), prompt="x")
    assert caught.value.status_code == 401
    assert caught.value.request_id
    assert upstream.edits == []


def test_auth_missing_key_is_401(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    response = httpx.post(gateway_url + "/v1/images/edits", files={"image": ("a.png", PNG)})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert upstream.edits == []


@pytest.mark.parametrize("header", ["Basic abc", "Bearer", "bearer x", CLIENT_KEY])
def test_auth_malformed_authorization_is_401(gateway_url: str, header: str) -> None:
    response = httpx.get(gateway_url + "/v1/models", headers={"authorization": header})
    assert response.status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "//v1/models",
        "/v1/models/",
        "/V1/models",
        "/v1%2Fmodels",
        "/v1/./models",
        "/healthz/../v1/models",
    ],
)
def test_auth_path_spellings_cannot_bypass(gateway_url: str, path: str) -> None:
    response = httpx.get(gateway_url + path, headers={"host": "localhost"})
    assert response.status_code == 401


def test_auth_health_endpoints_are_public(gateway_url: str) -> None:
    assert httpx.get(gateway_url + "/healthz").status_code == 200
    assert httpx.get(gateway_url + "/readyz").status_code == 200


@pytest.mark.parametrize(
    "reply",
    [
        Reply(
            status=401,
            body={
                "error": {
                    "message": f"Incorrect API key provided: {UPSTREAM_KEYS[0]}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
            },
        ),
        Reply(
            status=400,
            body={
                "error": {
                    "message": f"bad thing, key sk-test-upstream-AAAA***aaaa, {UPSTREAM_KEYS[1]}",
                    "type": "invalid_request_error",
                    "param": UPSTREAM_KEYS[0],
                    "code": None,
                }
            },
        ),
        Reply(status=500, body={"error": {"message": f"crash with {UPSTREAM_KEYS[0]}"}}),
        Reply(
            status=429,
            body={"error": {"message": f"slow down {UPSTREAM_KEYS[1]}"}},
            headers={"retry-after": "3"},
        ),
    ],
    ids=["401", "400", "500", "429"],
)
def test_auth_upstream_key_never_in_response(
    client: OpenAI, upstream: FakeOpenAIUpstream, reply: Reply
) -> None:
    upstream.enqueue(reply)
    raw = client.images.with_raw_response
    with pytest.raises(openai.APIStatusError) as caught:
        raw.edit(image=("a.png", PNG, "image/png"), prompt="x")
    response = caught.value.response
    exposed = response.text + repr(dict(response.headers)) + str(caught.value)
    for key in UPSTREAM_KEYS:
        assert key not in exposed
        assert key[:20] not in exposed
    assert "sk-test" not in exposed


def test_auth_admin_paths_do_not_exist_without_admin_keys(gateway_url: str) -> None:
    response = httpx.get(
        gateway_url + "/admin/anything", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert response.status_code == 404


def test_auth_admin_paths_take_admin_keys_only(fake_upstream: FakeOpenAIUpstream) -> None:
    from app.config.settings import load_settings
    from app.main import create_app
    from tests.support.gateway_env import gateway_env
    from tests.support.servers import serve_in_thread

    env = gateway_env(fake_upstream.url, GATEWAY_ADMIN_KEYS="igw-admin-secret-1")
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        as_client = httpx.get(url + "/admin/x", headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert as_client.status_code == 401
        assert httpx.get(url + "/admin/x").status_code == 401
        as_admin = httpx.get(
            url + "/admin/x", headers={"authorization": "Bearer igw-admin-secret-1"}
        )
        assert as_admin.status_code == 404  # authorised; no such admin route yet
        as_admin_on_v1 = httpx.get(
            url + "/v1/models", headers={"authorization": "Bearer igw-admin-secret-1"}
        )
        assert as_admin_on_v1.status_code == 401
