"""Acceptance 1: every case of the bad-input corpus gets a clear 4xx in OpenAI's error envelope,
names the field at fault, and never reaches the upstream."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.catalog import load_catalog
from tests.conftest import CLIENT_KEY, REPO
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening import multipart as mp
from tests.hardening.conftest import SmallGateway
from tests.hardening.corpus import Case, build
from tests.support import images

CASES = build(load_catalog(REPO / "config" / "models.yaml", known_upstreams={"default"}))


def post(url: str, case: Case) -> httpx.Response:
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    content = iter(case.chunks) if case.chunks is not None else case.body
    with httpx.Client(timeout=30) as http:
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
    client: object, gateway_url: str, small_gateway: SmallGateway, upstream: FakeOpenAIUpstream
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
