"""Acceptance: the real OpenAI SDK edits through the gateway, and the upstream receives exactly
the normalized fields and files."""

from __future__ import annotations

import hashlib

from openai import OpenAI

from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import UPSTREAM_KEYS


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_edit_single_image(client: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    source = images.png(64, 64)
    result = client.images.edit(image=("photo.png", source, "image/png"), prompt="a red hat")
    assert len(result.data) == 1 and result.data[0].b64_json
    (sent,) = upstream.edits
    assert sent.fields == [("model", "gpt-image-1.5"), ("prompt", "a red hat")]
    assert [(f.field, f.content_type, f.sha256) for f in sent.files] == [
        ("image", "image/png", sha(source))
    ]
    assert sent.files[0].filename == "image-0.png"  # never the client's filename
    assert sent.key in UPSTREAM_KEYS


def test_edit_list_of_three_images_keeps_order(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    sources = [images.png(64, 64), images.jpeg(80, 60), images.webp(40, 30)]
    client.images.edit(
        image=[
            ("a.png", sources[0], "image/png"),
            ("b.jpg", sources[1], "image/jpeg"),
            ("c.webp", sources[2], "image/webp"),
        ],
        prompt="combine them",
        model="gpt-image-1",
    )
    (sent,) = upstream.edits
    assert [(f.field, f.content_type, f.sha256) for f in sent.files] == [
        ("image[]", "image/png", sha(sources[0])),
        ("image[]", "image/jpeg", sha(sources[1])),
        ("image[]", "image/webp", sha(sources[2])),
    ]
    assert sent.field_map()["model"] == "gpt-image-1"


def test_edit_with_mask(client: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    source, mask = images.png(64, 64), images.mask_png(64, 64)
    client.images.edit(
        image=("a.png", source, "image/png"), mask=("m.png", mask, "image/png"), prompt="sky"
    )
    (sent,) = upstream.edits
    assert [(f.field, f.content_type, f.sha256) for f in sent.files] == [
        ("image", "image/png", sha(source)),
        ("mask", "image/png", sha(mask)),
    ]


def test_edit_n_2_returns_two_images_and_sends_n_as_integer_text(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    result = client.images.edit(image=("a.png", images.png(), "image/png"), prompt="x", n=2)
    assert len(result.data) == 2
    assert upstream.edits[0].field_map()["n"] == "2"


def test_edit_aspect_ratio_becomes_size_for_gpt_image(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    client.images.edit(
        image=("a.png", images.png(), "image/png"),
        prompt="wide",
        extra_body={"aspect_ratio": "16:9"},
    )
    fields = upstream.edits[0].field_map()
    assert fields["size"] == "1536x1024"
    assert "aspect_ratio" not in fields


def test_edit_aspect_ratio_passes_to_flux_and_size_is_mapped(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    client.images.edit(
        image=("a.png", images.png(), "image/png"),
        prompt="wide",
        model="flux-kontext-pro",
        extra_body={"aspect_ratio": "16:9"},
    )
    client.images.edit(
        image=("a.png", images.png(), "image/png"),
        prompt="tall",
        model="flux-kontext-max",
        size="1024x1536",
    )
    first, second = (r.field_map() for r in upstream.edits)
    assert first["aspect_ratio"] == "16:9" and "size" not in first
    assert second["aspect_ratio"] == "2:3" and "size" not in second
    assert second["model"] == "flux-kontext-max"


def test_edit_normalizes_fields_for_the_upstream(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    client.images.edit(
        image=("a.png", images.png(), "image/png"),
        prompt="x",
        model="gpt-image-2",
        size="2048x1152",
        quality="high",
        output_format="webp",
        output_compression=80,
        background="opaque",
        response_format="b64_json",
        extra_body={"lighting": "soft", "moderation": "low"},
    )
    fields = upstream.edits[0].fields
    assert dict(fields) == {
        "model": "gpt-image-2",
        "prompt": "x",
        "size": "2048x1152",
        "quality": "high",
        "output_format": "webp",
        "output_compression": "80",
        "background": "opaque",
        "moderation": "low",
        "lighting": "soft",  # unknown fields pass through unchanged
    }
    assert "response_format" not in dict(fields)  # OpenAI rejects it for GPT image models


def test_dall_e_2_gets_image_not_array_and_keeps_response_format(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    source = images.png(64, 64, mode="RGBA")
    client.images.edit(
        image=[("a.png", source, "image/png")],  # the SDK sends image[] for a list
        prompt="x",
        model="dall-e-2",
        size="256x256",
        response_format="b64_json",
    )
    (sent,) = upstream.edits
    assert [f.field for f in sent.files] == ["image"]
    assert sent.field_map()["response_format"] == "b64_json"


def test_response_fills_usage_input_token_details(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    result = client.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert result.usage is not None
    assert result.usage.input_tokens == 50
    assert result.usage.input_tokens_details.text_tokens == 0
    assert result.usage.input_tokens_details.image_tokens == 0


def test_indexed_image_fields_are_ordered_by_index(
    gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    import httpx

    from tests.support.constants import CLIENT_KEY

    first, second = images.png(32, 32), images.jpeg(32, 32)
    response = httpx.post(
        gateway_url + "/v1/images/edits",
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
        data={"prompt": "x"},
        files=[
            ("image[1]", ("b.jpg", second, "application/octet-stream")),
            ("image[0]", ("a.png", first, "application/octet-stream")),
        ],
    )
    assert response.status_code == 200, response.text
    sent = upstream.edits[0]
    assert [(f.sha256, f.content_type) for f in sent.files] == [
        (sha(first), "image/png"),  # sniffed, not the client's octet-stream
        (sha(second), "image/jpeg"),
    ]


def test_every_response_carries_a_request_id(client: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    raw = client.images.with_raw_response.edit(
        image=("a.png", images.png(), "image/png"), prompt="x"
    )
    assert raw.headers["x-request-id"].startswith("req_")


def test_upstream_request_id_is_passed_on(client: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    from tests.fakes.openai_upstream import Reply

    upstream.enqueue(Reply(headers={"x-request-id": "req_upstream_123"}))
    raw = client.images.with_raw_response.edit(
        image=("a.png", images.png(), "image/png"), prompt="x"
    )
    assert raw.headers["x-request-id"] == "req_upstream_123"


def test_upstream_request_id_is_passed_on_errors(
    client: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    import openai
    import pytest

    from tests.fakes.openai_upstream import Reply

    upstream.enqueue(
        Reply(status=400, body={"error": {"message": "no"}}, headers={"x-request-id": "req_up_9"})
    )
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.request_id == "req_up_9"
