"""Acceptance 4: a Flux model served by a `bfl` upstream first and an OpenAI-compatible reseller
second; with BFL failing, the key pool fails over and the client still gets its image."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.bfl_upstream import FakeBflUpstream, SubmitReply
from tests.fakes.openai_upstream import RESULT_PNG, FakeOpenAIUpstream
from tests.support import images
from tests.support.bfl_gateway import BFL_KEYS, sdk, serve_bfl_gateway
from tests.support.servers import free_port, serve_in_thread


@pytest.fixture
def reseller() -> Iterator[FakeOpenAIUpstream]:
    fake = FakeOpenAIUpstream()
    with serve_in_thread(fake.app) as url:
        fake.url = url + "/v1"
        yield fake


@pytest.fixture
def bfl() -> Iterator[FakeBflUpstream]:
    fake = FakeBflUpstream(keys=BFL_KEYS)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


def test_bfl_out_of_credits_falls_back_to_the_reseller(
    bfl: FakeBflUpstream, reseller: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    for _ in BFL_KEYS:
        bfl.submit_replies.append(SubmitReply(402, {"detail": "Insufficient credits"}))
    with serve_bfl_gateway(
        tmp_path,
        bfl_url=bfl.url,
        openai_url=reseller.url,
        flux_upstreams=("bfl", "default"),
        priorities={"bfl": 0, "default": 1},
    ) as url:
        client = sdk(url)
        result = client.images.edit(
            image=("a.png", images.png(), "image/png"),
            prompt="x",
            model="flux-kontext-pro",
            extra_body={"aspect_ratio": "16:9"},
        )
        assert base64.b64decode(result.data[0].b64_json or "") == RESULT_PNG
        # Both BFL keys were tried (and disabled for want of credits), then the reseller served it.
        assert sorted(hit.headers["x-key"] for hit in bfl.hits if hit.method == "POST") == sorted(
            BFL_KEYS
        )
        (sent,) = reseller.edits
        assert sent.field_map()["model"] == "flux-kontext-pro"
        assert sent.field_map()["aspect_ratio"] == "16:9"
        # The next request goes straight to the reseller: BFL's keys stay disabled.
        client.images.edit(image=("b.png", images.png(32, 32), "image/png"), prompt="y")
        assert len([hit for hit in bfl.hits if hit.method == "POST"]) == len(BFL_KEYS)
        assert len(reseller.edits) == 2


def test_bfl_unreachable_falls_back_to_the_reseller(
    reseller: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    with serve_bfl_gateway(
        tmp_path,
        bfl_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        openai_url=reseller.url,
        flux_upstreams=("bfl", "default"),
        priorities={"bfl": 0, "default": 1},
    ) as url:
        result = sdk(url).images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert len(result.data) == 1
    assert len(reseller.edits) == 1
