"""Acceptance for the `azure` upstream (issue 16, acceptance 3): the real OpenAI SDK edits and
generates through the gateway, and a fake Azure OpenAI resource on a real port sees Azure's
wire format (deployment path or v1 form, api-key, api-version) and answers with Azure's shapes."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.fakes.azure_upstream import AzureReply, FakeAzureOpenAI, azure_error
from tests.fakes.openai_upstream import RESULT_PNG
from tests.support import images
from tests.support.provider_gateways import (
    AZURE_DEPLOYMENT,
    AZURE_KEYS,
    AZURE_MODEL,
    AZURE_UNMAPPED_MODEL,
    serve_provider_gateway,
)
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

DEAD_URL = "http://127.0.0.1:9"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def azure_server() -> Iterator[FakeAzureOpenAI]:
    fake = FakeAzureOpenAI(keys=AZURE_KEYS, deployments=(AZURE_DEPLOYMENT, AZURE_UNMAPPED_MODEL))
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture
def azure(azure_server: FakeAzureOpenAI) -> Iterator[FakeAzureOpenAI]:
    azure_server.reset()
    yield azure_server
    azure_server.reset()


@pytest.fixture
def client(azure: FakeAzureOpenAI, tmp_path: Path) -> Iterator[OpenAI]:
    # One gateway per test: key health (cooldowns) must not leak between tests.
    with serve_provider_gateway(tmp_path, azure_url=azure.url, gemini_url=DEAD_URL) as url:
        yield sdk_client(url)


def test_azure_edit_one_image_goes_to_the_deployment(
    client: OpenAI, azure: FakeAzureOpenAI
) -> None:
    source = images.png(64, 48)
    result = client.images.edit(
        image=("photo.png", source, "image/png"), prompt="a red hat", model=AZURE_MODEL
    )
    (request,) = azure.requests
    assert request.path == f"/openai/deployments/{AZURE_DEPLOYMENT}/images/edits"
    assert request.query == {"api-version": "2025-04-01-preview"}
    assert request.key in AZURE_KEYS
    assert "authorization" not in request.headers
    ((upload),) = request.files
    assert (upload.field, upload.content_type, upload.sha256) == ("image", "image/png", sha(source))
    assert request.fields["model"] == AZURE_DEPLOYMENT
    assert request.fields["prompt"] == "a red hat"
    assert "response_format" not in request.fields  # GPT image deployments refuse it
    assert base64.b64decode(result.data[0].b64_json or "") == RESULT_PNG
    assert result.usage is not None and result.usage.total_tokens == 312


def test_azure_edit_several_images_and_a_mask_in_order(
    client: OpenAI, azure: FakeAzureOpenAI
) -> None:
    sources = [images.png(64, 64), images.jpeg(64, 64)]
    mask = images.mask_png(64, 64)
    client.images.edit(
        image=[("a.png", sources[0], "image/png"), ("b.jpg", sources[1], "image/jpeg")],
        mask=("m.png", mask, "image/png"),
        prompt="combine them",
        model=AZURE_MODEL,
        n=2,
    )
    (request,) = azure.requests
    assert [(f.field, f.content_type, f.sha256) for f in request.files] == [
        ("image[]", "image/png", sha(sources[0])),
        ("image[]", "image/jpeg", sha(sources[1])),
        ("mask", "image/png", sha(mask)),
    ]
    assert request.fields["n"] == "2"


def test_azure_generation_is_json_to_the_deployment(client: OpenAI, azure: FakeAzureOpenAI) -> None:
    result = client.images.generate(prompt="a lighthouse", model=AZURE_MODEL, n=2)
    (request,) = azure.requests
    assert request.path == f"/openai/deployments/{AZURE_DEPLOYMENT}/images/generations"
    assert request.query == {"api-version": "2025-04-01-preview"}
    assert request.json["model"] == AZURE_DEPLOYMENT
    assert request.json["prompt"] == "a lighthouse"
    assert request.json["n"] == 2
    assert len(result.data) == 2


def test_azure_v1_form_names_the_deployment_in_the_body(
    azure: FakeAzureOpenAI, tmp_path: Path
) -> None:
    with serve_provider_gateway(
        tmp_path, azure_url=azure.url, gemini_url=DEAD_URL, azure={"api_form": "v1"}
    ) as url:
        v1 = sdk_client(url)
        v1.images.edit(image=("a.png", images.png(), "image/png"), prompt="x", model=AZURE_MODEL)
        v1.images.generate(prompt="y", model=AZURE_UNMAPPED_MODEL)
    edit, generation = azure.requests
    assert (edit.path, edit.query, edit.fields["model"]) == (
        "/openai/v1/images/edits",
        {},
        AZURE_DEPLOYMENT,
    )
    # No deployments entry: the deployment is named like the model's upstream_model.
    assert (generation.path, generation.json["model"]) == (
        "/openai/v1/images/generations",
        AZURE_UNMAPPED_MODEL,
    )
    assert all(request.key in AZURE_KEYS for request in azure.requests)


@pytest.mark.parametrize(
    "error",
    [
        # The image API's own refusal (how-to/dall-e.md).
        azure_error("contentFilter", "Your task failed as a result of our safety system."),
        # The content filter's 400 with its inner error (concepts/content-filter.md).
        azure_error(
            "content_filter",
            "The response was filtered due to the prompt triggering Azure OpenAI's content "
            "management policy.",
            param="prompt",
            innererror={
                "code": "ResponsibleAIPolicyViolation",
                "content_filter_result": {"violence": {"filtered": True, "severity": "high"}},
            },
        ),
    ],
    ids=["contentFilter", "content_filter-innererror"],
)
def test_azure_content_filter_is_moderation_blocked(
    client: OpenAI, azure: FakeAzureOpenAI, error: dict[str, object]
) -> None:
    azure.replies.append(AzureReply(status=400, body=error))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == 400
    assert caught.value.code == "moderation_blocked"
    assert len(azure.requests) == 1  # a refusal is never retried on another key


def rate_limited_reply() -> AzureReply:
    return AzureReply(
        status=429,
        body=azure_error(
            "429",
            "Requests to the Images_Edit Operation under Azure OpenAI API version "
            "2025-04-01-preview have exceeded call rate limit of your current pricing tier. "
            "Please retry after 30 seconds.",
        ),
        headers={"retry-after": "30", "retry-after-ms": "30000"},
    )


def test_azure_429_cools_the_key_and_the_next_request_uses_the_other(
    client: OpenAI, azure: FakeAzureOpenAI
) -> None:
    azure.replies.append(rate_limited_reply())
    client.images.edit(image=("a.png", images.png(), "image/png"), prompt="first")
    limited, retried = azure.requests
    assert limited.key != retried.key
    client.images.edit(image=("a.png", images.png(), "image/png"), prompt="second")
    assert azure.requests[2].key == retried.key  # the limited key is cooling for 30 s


def test_azure_5xx_is_retried_once_on_another_key(client: OpenAI, azure: FakeAzureOpenAI) -> None:
    azure.replies.append(AzureReply(status=500, body=azure_error("InternalServerError", "x")))
    client.images.generate(prompt="z", model=AZURE_MODEL)
    failed, retried = azure.requests
    assert failed.key != retried.key
    azure.reset()
    for _ in range(2):
        azure.replies.append(AzureReply(status=503, body=azure_error("ServiceUnavailable", "x")))
    with pytest.raises(openai.InternalServerError) as caught:
        client.images.generate(prompt="z", model=AZURE_MODEL)
    assert caught.value.status_code == 502
    assert len(azure.requests) == 2


def test_azure_rules_refuse_before_anything_is_sent(client: OpenAI, azure: FakeAzureOpenAI) -> None:
    # Azure's image edits take PNG or JPEG and never return webp.
    with pytest.raises(openai.BadRequestError) as webp_input:
        client.images.edit(image=("a.webp", images.webp(), "image/webp"), prompt="x")
    with pytest.raises(openai.BadRequestError) as webp_output:
        client.images.generate(prompt="x", model=AZURE_MODEL, output_format="webp")
    assert webp_input.value.body["param"] == "image"  # type: ignore[index]
    assert webp_output.value.body["param"] == "output_format"  # type: ignore[index]
    assert azure.requests == []


def test_azure_keys_never_reach_an_answer_or_a_log(
    client: OpenAI, azure: FakeAzureOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    first, second = AZURE_KEYS
    echoed = f"Access denied for keys {first} and {second[:8]}...{second[-10:]}"
    azure.replies.extend(
        [
            AzureReply(status=400, body=azure_error("content_filter", echoed)),
            rate_limited_reply(),
            AzureReply(),  # the retry on the other key succeeds
            AzureReply(status=400, body=azure_error("invalid_value", echoed, param=echoed)),
            AzureReply(status=401, body=azure_error("401", echoed)),
        ]
    )
    seen: list[str] = []
    for prompt in ("filtered", "limited", "invalid", "unauthorized"):
        try:
            raw = client.images.with_raw_response.generate(prompt=prompt, model=AZURE_MODEL)
            seen.append(f"{raw.http_response.headers} {raw.http_response.text}")
        except openai.APIStatusError as exc:
            seen.append(f"{exc.response.status_code} {exc.response.headers} {exc.response.text}")
    assert len(azure.requests) == 5  # every scripted answer was served
    assert seen[0].startswith("400") and "moderation_blocked" in seen[0]
    logged = "\n".join(caplog.handler.format(record) for record in caplog.records)
    # The gateway's own records (access log, upstream failures) really were captured.
    assert any(record.name.startswith("gateway.") for record in caplog.records)
    for key in AZURE_KEYS:
        for fragment in (key, key[-10:]):
            assert all(fragment not in text for text in seen)
            assert fragment not in logged
