"""Acceptance 1: every case of the bad-input corpus gets a clear 4xx in OpenAI's error envelope,
names the field at fault, and never reaches the upstream."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import APIStatusError, BadRequestError, NotFoundError, OpenAI

from app.config.catalog import load_catalog
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening import multipart as mp
from tests.hardening.conftest import SmallGateway
from tests.hardening.corpus import Case, build
from tests.support import images
from tests.support.constants import CLIENT_KEY, REPO
from tests.support.sdk import tls_context

CASES = build(load_catalog(REPO / "config" / "models.yaml", known_upstreams={"default"}))


@pytest.fixture(scope="module")
def gateway_url(refusing_gateway_url: str) -> str:
    # Every test here is refused before an upstream key is used (or succeeds): one gateway serves
    # the module.
    return refusing_gateway_url


def post(url: str, case: Case) -> httpx.Response:
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    content = iter(case.chunks) if case.chunks is not None else case.body
    with httpx.Client(timeout=30, verify=tls_context()) as http:
        return http.post(url + "/v1/images/edits", content=content, headers=headers)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_corpus_case_is_refused_with_envelope_and_param(
    case: Case, gateway_url: str, small_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    url = small_gateway.url if case.limits == "small" else gateway_url
    response = post(url, case)
    assert response.status_code == case.status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers.get("x-request-id", "").startswith("req_")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["code"] == case.code
    assert error["param"] == case.param
    assert case.message.lower() in error["message"].lower()
    assert len(error["message"]) < 600  # a sentence, never an echo of the hostile input
    assert upstream.edits == []


def test_corpus_covers_every_case_the_issue_lists() -> None:
    ids = {case.id for case in CASES}
    listed = {
        "no-image", "no-prompt", "empty-file", "text-named-png", "truncated-png",
        "truncated-jpeg", "truncated-webp", "format-gif", "format-bmp", "format-svg",
        "format-tiff", "png-bomb-100000x100000", "17-images", "image-over-file-cap",
        "body-over-cap-content-length", "body-over-cap-chunked", "mask-wrong-size", "mask-jpeg",
        "mask-no-alpha", "two-masks", "prompt-over-dall-e-2-max", "n='0'", "n='11'", "n='-1'",
        "n='1.5'", "n='abc'", "unknown-model", "duplicate-n", "missing-boundary",
        "overlong-boundary", "mismatched-boundary", "junk-before-first-boundary",
        "10000-tiny-parts", "1mb-part-header", "non-utf8-prompt", "application-json",
        "form-urlencoded",
    }  # fmt: skip
    assert listed <= ids, listed - ids
    enums = [case for case in CASES if case.id.endswith("-wrong")]
    assert {case.param for case in enums} >= {
        "size", "quality", "background", "output_format", "response_format", "moderation",
        "input_fidelity", "aspect_ratio", "stream",
    }  # fmt: skip


def test_corpus_filename_with_dot_dot_is_never_used(
    small_gateway: SmallGateway, upstream: FakeOpenAIUpstream
) -> None:
    # A filename is the client's business: the edit goes through, the name goes nowhere.
    body = mp.encode(
        [
            mp.file("image", images.png(64, 64), filename="../../../../etc/cron.d/evil.png"),
            mp.text("prompt", "x"),
        ]
    )
    headers = {"authorization": f"Bearer {CLIENT_KEY}", "content-type": mp.content_type()}
    with httpx.Client(timeout=30) as http:
        response = http.post(small_gateway.url + "/v1/images/edits", content=body, headers=headers)
    assert response.status_code == 200, response.text
    (sent,) = upstream.edits
    assert [f.filename for f in sent.files] == ["image-0.png"]
    assert "evil" not in str(sent.headers) + str(sent.fields)
    assert list(small_gateway.spool_dir.iterdir()) == []
    assert not Path("/etc/cron.d/evil.png").exists()


SDK_CASES: list[tuple[str, dict[str, Any], type[APIStatusError], str, str]] = [
    ("n=0", {"n": 0}, BadRequestError, "n", "invalid_value"),
    ("n=11", {"n": 11}, BadRequestError, "n", "invalid_value"),
    ("n=-1", {"n": -1}, BadRequestError, "n", "invalid_value"),
    ("n=1.5", {"n": 1.5}, BadRequestError, "n", "invalid_value"),
    ("n=abc", {"n": "abc"}, BadRequestError, "n", "invalid_value"),
    ("unknown-model", {"model": "gpt-image-99"}, NotFoundError, "model", "model_not_found"),
    ("empty-prompt", {"prompt": ""}, BadRequestError, "prompt", "missing_required_parameter"),
    ("size", {"size": "1000x999"}, BadRequestError, "size", "invalid_value"),
    ("quality", {"quality": "ultra"}, BadRequestError, "quality", "invalid_value"),
    ("background", {"background": "glass"}, BadRequestError, "background", "invalid_value"),
    ("aspect", {"extra_body": {"aspect_ratio": "5:4"}}, BadRequestError, "aspect_ratio",
     "invalid_value"),
    ("text-image", {"image": ("a.png", b"just text", "image/png")}, BadRequestError, "image",
     "invalid_image"),
    ("gif", {"image": ("a.gif", images.other_format("gif"), "image/gif")}, BadRequestError,
     "image", "invalid_image"),
    ("bomb", {"image": ("a.png", images.png_bomb_header(), "image/png")}, BadRequestError,
     "image", "image_too_large"),
    ("17-images", {"image": [("a.png", images.png(), "image/png")] * 17}, BadRequestError,
     "image", "too_many_images"),
    ("mask-jpeg", {"mask": ("m.jpg", images.jpeg(64, 64), "image/jpeg")}, BadRequestError,
     "mask", "invalid_mask"),
    ("mask-size", {"mask": ("m.png", images.mask_png(32, 32), "image/png")}, BadRequestError,
     "mask", "invalid_mask"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "error", "param", "code"),
    [case[1:] for case in SDK_CASES],
    ids=[case[0] for case in SDK_CASES],
)
def test_corpus_through_the_sdk_raises_the_right_error(
    client: OpenAI,
    upstream: FakeOpenAIUpstream,
    kwargs: dict[str, Any],
    error: type[APIStatusError],
    param: str,
    code: str,
) -> None:
    arguments: dict[str, Any] = {"image": ("a.png", images.png(64, 64), "image/png"), "prompt": "x"}
    with pytest.raises(error) as caught:
        client.images.edit(**{**arguments, **kwargs})
    body = caught.value.body
    assert isinstance(body, dict)
    assert (body.get("param"), body.get("code")) == (param, code)
    assert caught.value.request_id is not None
    assert upstream.edits == []
