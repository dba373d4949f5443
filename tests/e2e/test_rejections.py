"""Acceptance: every rejection of SPEC sections 2 and 8 that the core applies yields the right
status, `param` and SDK exception class, and the upstream receives nothing."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.sdk import tls_context

PNG = images.png(64, 64)


@pytest.fixture(scope="module")
def gateway_url(refusing_gateway_url: str) -> str:
    # Every test here is refused before an upstream key is used (or succeeds): one gateway serves
    # the module.
    return refusing_gateway_url


def png_file(data: bytes = PNG, name: str = "a.png") -> tuple[str, bytes, str]:
    return (name, data, "image/png")


SDK_CASES: list[tuple[str, dict[str, Any], type[openai.APIStatusError], int, str | None]] = [
    ("empty file", {"image": png_file(b"")}, openai.BadRequestError, 400, "image"),
    (
        "text named .png",
        {"image": png_file(b"hello, I am text")},
        openai.BadRequestError,
        400,
        "image",
    ),
    ("truncated png", {"image": png_file(PNG[:-20])}, openai.BadRequestError, 400, "image"),
    (
        "truncated jpeg",
        {"image": png_file(images.jpeg()[:-10])},
        openai.BadRequestError,
        400,
        "image",
    ),
    (
        "truncated webp",
        {"image": png_file(images.webp()[:-10])},
        openai.BadRequestError,
        400,
        "image",
    ),
    ("gif", {"image": png_file(images.other_format("gif"))}, openai.BadRequestError, 400, "image"),
    ("bmp", {"image": png_file(images.other_format("bmp"))}, openai.BadRequestError, 400, "image"),
    (
        "tiff",
        {"image": png_file(images.other_format("tiff"))},
        openai.BadRequestError,
        400,
        "image",
    ),
    ("svg", {"image": png_file(images.other_format("svg"))}, openai.BadRequestError, 400, "image"),
    (
        "bomb header",
        {"image": png_file(images.png_bomb_header())},
        openai.BadRequestError,
        400,
        "image",
    ),
    (
        "second image broken",
        {"image": [png_file(), png_file(b"junk")]},
        openai.BadRequestError,
        400,
        "image[1]",
    ),
    ("17 images", {"image": [png_file()] * 17}, openai.BadRequestError, 400, "image"),
    ("prompt too long", {"prompt": "x" * 32001}, openai.BadRequestError, 400, "prompt"),
    (
        "dall-e-2 prompt too long",
        {
            "prompt": "x" * 1001,
            "model": "dall-e-2",
            "image": png_file(images.png(64, 64, mode="RGBA")),
        },
        openai.BadRequestError,
        400,
        "prompt",
    ),
    ("empty prompt", {"prompt": "  "}, openai.BadRequestError, 400, "prompt"),
    ("n=0", {"n": 0}, openai.BadRequestError, 400, "n"),
    ("n=11", {"n": 11}, openai.BadRequestError, 400, "n"),
    ("n=-1", {"n": -1}, openai.BadRequestError, 400, "n"),
    ("n=1.5", {"extra_body": {"n": "1.5"}}, openai.BadRequestError, 400, "n"),
    ("n=abc", {"extra_body": {"n": "abc"}}, openai.BadRequestError, 400, "n"),
    ("bad size", {"size": "999x999"}, openai.BadRequestError, 400, "size"),
    ("custom size on fixed model", {"size": "2048x1152"}, openai.BadRequestError, 400, "size"),
    (
        "custom size not multiple of 16",
        {"size": "1000x1000", "model": "gpt-image-2"},
        openai.BadRequestError,
        400,
        "size",
    ),
    (
        "custom size ratio over 3:1",
        {"size": "3840x1024", "model": "gpt-image-2"},
        openai.BadRequestError,
        400,
        "size",
    ),
    ("bad quality", {"quality": "ultra"}, openai.BadRequestError, 400, "quality"),
    ("xhigh on older model", {"quality": "xhigh"}, openai.BadRequestError, 400, "quality"),
    ("bad background", {"background": "green"}, openai.BadRequestError, 400, "background"),
    ("bad output_format", {"output_format": "gif"}, openai.BadRequestError, 400, "output_format"),
    (
        "bad moderation",
        {"extra_body": {"moderation": "high"}},
        openai.BadRequestError,
        400,
        "moderation",
    ),
    (
        "bad input_fidelity",
        {"extra_body": {"input_fidelity": "max"}},
        openai.BadRequestError,
        400,
        "input_fidelity",
    ),
    (
        "bad response_format",
        {"response_format": "png"},
        openai.BadRequestError,
        400,
        "response_format",
    ),
    (
        "bad aspect_ratio",
        {"extra_body": {"aspect_ratio": "5:4"}},
        openai.BadRequestError,
        400,
        "aspect_ratio",
    ),
    (
        "output_compression over 100",
        {"output_format": "jpeg", "output_compression": 101},
        openai.BadRequestError,
        400,
        "output_compression",
    ),
    (
        "output_compression with png",
        {"output_compression": 50},
        openai.BadRequestError,
        400,
        "output_compression",
    ),
    (
        "transparent background with jpeg",
        {"background": "transparent", "output_format": "jpeg"},
        openai.BadRequestError,
        400,
        "background",
    ),
    (
        "size and aspect_ratio together",
        {"size": "1024x1024", "extra_body": {"aspect_ratio": "1:1"}},
        openai.BadRequestError,
        400,
        "aspect_ratio",
    ),
    (
        "partial_images without stream",
        {"partial_images": 2},
        openai.BadRequestError,
        400,
        "partial_images",
    ),
    ("unknown model", {"model": "gpt-9-imaginary"}, openai.NotFoundError, 404, "model"),
    (
        "dall-e-2 non-square",
        {"model": "dall-e-2", "image": png_file(images.png(64, 32, mode="RGBA"))},
        openai.BadRequestError,
        400,
        "image",
    ),
    (
        "dall-e-2 jpeg",
        {"model": "dall-e-2", "image": png_file(images.jpeg(64, 64))},
        openai.BadRequestError,
        400,
        "image",
    ),
    (
        "dall-e-2 two images",
        {"model": "dall-e-2", "image": [png_file(), png_file()]},
        openai.BadRequestError,
        400,
        "image",
    ),
    (
        "dall-e-2 background",
        {"model": "dall-e-2", "background": "opaque"},
        openai.BadRequestError,
        400,
        "background",
    ),
    (
        "mask wrong size",
        {"mask": png_file(images.mask_png(32, 32))},
        openai.BadRequestError,
        400,
        "mask",
    ),
    (
        "mask jpeg",
        {"mask": ("m.jpg", images.jpeg(64, 64), "image/jpeg")},
        openai.BadRequestError,
        400,
        "mask",
    ),
    (
        "mask without alpha",
        {"mask": png_file(images.png(64, 64))},
        openai.BadRequestError,
        400,
        "mask",
    ),
    (
        "mask on flux",
        {"model": "flux-kontext-pro", "mask": png_file(images.mask_png(64, 64))},
        openai.BadRequestError,
        400,
        "mask",
    ),
    (
        "five images on flux",
        {"model": "flux-kontext-max", "image": [png_file()] * 5},
        openai.BadRequestError,
        400,
        "image",
    ),
    (
        "unknown response_format",
        {"extra_body": {"response_format": "png"}},
        openai.BadRequestError,
        400,
        "response_format",
    ),
    (
        "stream not a boolean",
        {"extra_body": {"stream": "sometimes"}},
        openai.BadRequestError,
        400,
        "stream",
    ),
    (
        "partial_images above 3",
        {"extra_body": {"stream": "true", "partial_images": "4"}},
        openai.BadRequestError,
        400,
        "partial_images",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "exc_class", "status", "param"),
    [case[1:] for case in SDK_CASES],
    ids=[case[0] for case in SDK_CASES],
)
def test_rejection_through_sdk(
    client: OpenAI,
    upstream: FakeOpenAIUpstream,
    overrides: dict[str, Any],
    exc_class: type[openai.APIStatusError],
    status: int,
    param: str | None,
) -> None:
    kwargs: dict[str, Any] = {"image": png_file(), "prompt": "edit it"}
    kwargs.update(overrides)
    with pytest.raises(exc_class) as caught:
        client.images.edit(**kwargs)
    error = caught.value
    assert error.status_code == status
    body = error.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["param"] == param
    assert body["type"] == "invalid_request_error"
    assert len(body["message"]) > 10
    assert error.request_id
    assert upstream.edits == []


def post(gateway_url: str, **kwargs: Any) -> httpx.Response:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", **kwargs.pop("headers", {})}
    return httpx.post(
        gateway_url + "/v1/images/edits",
        headers=headers,
        timeout=30,
        verify=tls_context(),
        **kwargs,
    )


def assert_envelope(response: httpx.Response, status: int, param: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    return error


def test_rejection_missing_image(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    assert_envelope(post(gateway_url, files={"prompt": (None, "x")}), 400, "image")
    assert upstream.edits == []


def test_rejection_missing_prompt(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    assert_envelope(post(gateway_url, files={"image": ("a.png", PNG)}), 400, "prompt")
    assert upstream.edits == []


def test_rejection_image_sent_as_text(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    response = post(gateway_url, files={"prompt": (None, "x"), "image": (None, "not a file")})
    assert assert_envelope(response, 400, "image")["code"] == "invalid_type"
    assert upstream.edits == []


def test_rejection_two_masks(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    mask = images.mask_png(64, 64)
    response = post(
        gateway_url,
        data={"prompt": "x"},
        files=[("image", ("a.png", PNG)), ("mask", ("m.png", mask)), ("mask[]", ("n.png", mask))],
    )
    assert_envelope(response, 400, "mask")
    assert upstream.edits == []


def test_rejection_duplicate_scalar_field(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    response = post(
        gateway_url,
        files=[
            ("image", ("a.png", PNG)),
            ("prompt", (None, "x")),
            ("n", (None, "1")),
            ("n", (None, "2")),
        ],
    )
    assert assert_envelope(response, 400, "n")["code"] == "duplicate_parameter"
    assert upstream.edits == []


def test_rejection_unexpected_file_field(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    response = post(
        gateway_url,
        data={"prompt": "x"},
        files=[("image", ("a.png", PNG)), ("extra", ("e.png", PNG))],
    )
    assert_envelope(response, 400, "extra")
    assert upstream.edits == []


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        # application/json is a JSON edit now (tests/e2e/test_json_edits.py).
        ("application/x-www-form-urlencoded", b"prompt=x&image=a"),
        ("text/plain", b"hello"),
    ],
)
def test_rejection_non_multipart_body(
    gateway_url: str, upstream: FakeOpenAIUpstream, content_type: str, body: bytes
) -> None:
    response = post(gateway_url, content=body, headers={"content-type": content_type})
    assert_envelope(response, 415, None)
    assert upstream.edits == []


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\n"),
        ("multipart/form-data; boundary=" + "b" * 71, b"--" + b"b" * 71 + b"--\r\n"),
        (
            "multipart/form-data; boundary=right",
            b'--wrong\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n--wrong--\r\n',
        ),
        (
            "multipart/form-data; boundary=b",
            b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nx\r\n',  # no closing
        ),
    ],
    ids=["no boundary", "overlong boundary", "mismatched boundary", "unterminated"],
)
def test_rejection_malformed_multipart(
    gateway_url: str, upstream: FakeOpenAIUpstream, content_type: str, body: bytes
) -> None:
    response = post(gateway_url, content=body, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert upstream.edits == []


def test_rejection_non_utf8_prompt(gateway_url: str, upstream: FakeOpenAIUpstream) -> None:
    response = post(
        gateway_url, files=[("image", ("a.png", PNG)), ("prompt", (None, b"\xff\xfe bad"))]
    )
    assert_envelope(response, 400, "prompt")
    assert upstream.edits == []


def test_rejection_unknown_endpoint_is_openai_shaped(gateway_url: str) -> None:
    response = httpx.get(
        gateway_url + "/v1/nothing", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert_envelope(response, 404, None)


def test_rejection_wrong_method_says_which_are_allowed(gateway_url: str) -> None:
    response = httpx.get(
        gateway_url + "/v1/images/edits", headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert_envelope(response, 405, None)
    assert response.json()["error"]["code"] == "method_not_allowed"
    assert response.headers["allow"] == "POST"
