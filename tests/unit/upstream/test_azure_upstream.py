"""The azure dialect on its own: where each call goes in both URL forms, how the key is sent, and
how Azure's refusals and rate limits become the gateway's failures."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from app.config.settings import AzureSettings, Settings
from app.config.yaml_source import ConfigError
from app.errors import GatewayError
from app.intake.request import EditRequest
from app.observability.redaction import Redactor
from app.upstream.azure import DEFAULT_API_VERSION, AzureTarget, AzureUpstream, rejection_code
from app.upstream.base import UpstreamAnswer, UpstreamKey
from tests.support.provider_gateways import (
    AZURE_DEPLOYMENT,
    AZURE_KEYS,
    AZURE_MODEL,
    provider_settings,
    write_provider_config,
)

KEY = UpstreamKey(id="azure#1", secret=SecretStr(AZURE_KEYS[0]))
BASE = "https://res.openai.azure.com"


def test_azure_target_deployments_form_carries_the_api_version() -> None:
    target = AzureTarget(BASE + "/", AzureSettings())
    assert target.url("images/edits", "my deploy") == (
        f"{BASE}/openai/deployments/my%20deploy/images/edits?api-version={DEFAULT_API_VERSION}"
    )
    assert target.url("models", "") == f"{BASE}/openai/models?api-version={DEFAULT_API_VERSION}"
    pinned = AzureTarget(BASE, AzureSettings(api_version="2024-10-21"))
    assert pinned.url("images/generations", "d").endswith(
        "/d/images/generations?api-version=2024-10-21"
    )


def test_azure_target_v1_form_needs_no_api_version() -> None:
    target = AzureTarget(BASE, AzureSettings(api_form="v1"))
    assert target.url("images/edits", "d") == f"{BASE}/openai/v1/images/edits"
    assert target.url("models", "") == f"{BASE}/openai/v1/models"
    preview = AzureTarget(BASE, AzureSettings(api_form="v1", api_version="preview"))
    assert preview.url("images/generations", "d") == (
        f"{BASE}/openai/v1/images/generations?api-version=preview"
    )


def test_azure_target_sends_the_key_as_api_key_only() -> None:
    assert AzureTarget(BASE, AzureSettings()).auth_headers(KEY) == {"api-key": AZURE_KEYS[0]}


@pytest.mark.parametrize(
    ("error", "code"),
    [
        ({"code": "contentFilter", "message": "Your task failed"}, "moderation_blocked"),
        ({"code": "content_filter", "param": "prompt"}, "moderation_blocked"),
        ({"code": "content_policy_violation"}, "moderation_blocked"),
        (
            {"code": None, "innererror": {"code": "ResponsibleAIPolicyViolation"}},
            "moderation_blocked",
        ),
        (
            {"code": "x", "inner_error": {"code": "ResponsibleAIPolicyViolation"}},
            "moderation_blocked",
        ),
        ({"code": "invalid_value", "param": "size"}, None),
        ({"code": "DeploymentNotFound"}, None),
    ],
)
def test_azure_rejection_code_names_content_filter_refusals(
    error: dict[str, object], code: str | None
) -> None:
    assert rejection_code(error) == code


def azure_call(
    tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response]
) -> tuple[UpstreamAnswer | GatewayError, list[httpx.Request]]:
    settings: Settings = provider_settings(
        write_provider_config(tmp_path, azure_url=BASE, gemini_url="http://127.0.0.1:9")
    )
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    edit = EditRequest(
        model=settings.catalog.models[AZURE_MODEL],
        prompt="p",
        images=(),
        mask=None,
        params={"n": 1},
        extra_fields=(),
        response_format=None,
        n=1,
        operation="generation",
    )

    async def go() -> UpstreamAnswer | GatewayError:
        async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
            upstream = AzureUpstream(
                "azure", settings.upstreams["azure"], client, Redactor(AZURE_KEYS)
            )
            try:
                return await upstream.edit(edit, KEY)
            except GatewayError as exc:
                return exc

    return asyncio.run(go()), seen


def test_azure_generation_request_goes_to_the_mapped_deployment(tmp_path: Path) -> None:
    answer, (request,) = azure_call(
        tmp_path, lambda _: httpx.Response(200, json={"created": 1, "data": [{"b64_json": "AA=="}]})
    )
    assert isinstance(answer, UpstreamAnswer)
    assert str(request.url) == (
        f"{BASE}/openai/deployments/{AZURE_DEPLOYMENT}/images/generations"
        f"?api-version={DEFAULT_API_VERSION}"
    )
    assert request.headers["api-key"] == AZURE_KEYS[0]
    assert "authorization" not in request.headers
    assert b'"model":"images-prod-eastus"' in request.content


def test_azure_failures_map_like_openai(tmp_path: Path) -> None:
    filtered, _ = azure_call(
        tmp_path,
        lambda _: httpx.Response(
            400,
            json={
                "error": {
                    "code": "content_filter",
                    "message": "The response was filtered",
                    "innererror": {"code": "ResponsibleAIPolicyViolation"},
                }
            },
        ),
    )
    assert isinstance(filtered, GatewayError)
    assert (filtered.status_code, filtered.code, filtered.failure) == (
        400,
        "moderation_blocked",
        "rejected",
    )
    limited, _ = azure_call(
        tmp_path,
        lambda _: httpx.Response(
            429,
            json={"error": {"code": "429", "message": "Rate limit is exceeded."}},
            headers={"retry-after": "7", "retry-after-ms": "6500"},
        ),
    )
    assert isinstance(limited, GatewayError)
    assert limited.failure == "rate_limited"
    assert limited.upstream_headers["retry-after-ms"] == "6500"  # the pool's cooldown
    assert limited.headers["retry-after"] == "7"
    refused, _ = azure_call(
        tmp_path, lambda _: httpx.Response(401, json={"error": {"code": "401", "message": "no"}})
    )
    assert isinstance(refused, GatewayError) and refused.failure == "auth"
    broken, _ = azure_call(tmp_path, lambda _: httpx.Response(500, json={"error": {}}))
    assert isinstance(broken, GatewayError) and broken.failure == "server"


def test_startup_refuses_a_deployment_for_a_model_not_in_the_catalog(tmp_path: Path) -> None:
    path = write_provider_config(
        tmp_path,
        azure_url=BASE,
        gemini_url="http://127.0.0.1:9",
        azure={"deployments": {"gpt-image-15": "typo"}},
    )
    with pytest.raises(ConfigError, match=r"upstreams\.azure\.azure\.deployments: 'gpt-image-15'"):
        provider_settings(path)
