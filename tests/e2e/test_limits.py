"""Size limits hold while the body streams in: 413 as soon as one is crossed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.config.settings import load_settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_env import gateway_env
from tests.support.servers import serve_in_thread

PNG = images.png(64, 64)


@pytest.fixture(scope="module")
def small_gateway(
    fake_upstream: FakeOpenAIUpstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    config = write_gateway_config(
        tmp_path_factory.mktemp("limits"),
        limits={
            "max_body_bytes": 2_000_000,
            "max_file_bytes": 1_000_000,
            "max_parts": 20,
            "max_field_bytes": 1000,
            "spool_threshold_bytes": 100_000,
        },
    )
    env = gateway_env(fake_upstream.url, GATEWAY_CONFIG=str(config))
    with serve_in_thread(create_app(load_settings(env=env))) as url:
        yield url


def post(url: str, **kwargs: object) -> httpx.Response:
    headers = {"authorization": f"Bearer {CLIENT_KEY}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(url + "/v1/images/edits", headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]


def multipart(parts: list[tuple[str, bytes, bool]], boundary: bytes = b"limitb") -> bytes:
    out = b""
    for name, value, is_file in parts:
        filename = b'; filename="f.png"' if is_file else b""
        out += (
            b"--"
            + boundary
            + b'\r\nContent-Disposition: form-data; name="'
            + name.encode()
            + b'"'
            + filename
            + b"\r\n\r\n"
            + value
            + b"\r\n"
        )
    return out + b"--" + boundary + b"--\r\n"


CT = {"content-type": "multipart/form-data; boundary=limitb"}


def test_limits_declared_body_over_cap_refused_before_reading(
    small_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    body = multipart([("prompt", b"x", False), ("image", b"\0" * 2_100_000, True)])
    response = post(small_gateway, content=body, headers=CT)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert upstream.edits == []


def test_limits_chunked_body_over_cap(small_gateway: str, upstream: FakeOpenAIUpstream) -> None:
    body = multipart(
        [("prompt", b"x", False)] + [(f"image[{i}]", b"\1" * 600_000, True) for i in range(4)]
    )

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    response = post(small_gateway, content=chunks(), headers=CT)  # no Content-Length
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "body_too_large"
    assert upstream.edits == []


def test_limits_file_over_cap(small_gateway: str, upstream: FakeOpenAIUpstream) -> None:
    body = multipart(
        [("prompt", b"x", False), ("image[]", PNG, True), ("image[]", b"\2" * 1_200_000, True)]
    )
    response = post(small_gateway, content=body, headers=CT)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "file_too_large" and error["param"] == "image[1]"
    assert upstream.edits == []


def test_limits_too_many_parts(small_gateway: str, upstream: FakeOpenAIUpstream) -> None:
    body = multipart([("prompt", b"x", False)] + [(f"x{i}", b"1", False) for i in range(30)])
    response = post(small_gateway, content=body, headers=CT)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_many_parts"
    assert upstream.edits == []


def test_limits_text_field_over_cap(small_gateway: str, upstream: FakeOpenAIUpstream) -> None:
    body = multipart([("image", PNG, True), ("prompt", b"y" * 2000, False)])
    response = post(small_gateway, content=body, headers=CT)
    assert response.status_code == 413
    assert response.json()["error"]["param"] == "prompt"
    assert upstream.edits == []


def test_limits_huge_part_header(small_gateway: str, upstream: FakeOpenAIUpstream) -> None:
    body = (
        b'--limitb\r\nContent-Disposition: form-data; name="prompt"\r\nX-Junk: '
        + b"a" * 100_000
        + b"\r\n\r\nx\r\n--limitb--\r\n"
    )
    response = post(small_gateway, content=body, headers=CT)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_multipart"
    assert upstream.edits == []


def test_limits_spooled_upload_is_forwarded_intact(
    small_gateway: str, upstream: FakeOpenAIUpstream
) -> None:
    # Over the 100 kB spool threshold: the bytes go through a temp file and must arrive intact.
    big = images.noise_png(300, 300)
    assert len(big) > 100_000
    response = post(small_gateway, files={"image": ("a.png", big), "prompt": (None, "x")})
    assert response.status_code == 200, response.text
    assert upstream.edits[0].files[0].data == big


def test_limits_leave_no_open_spool_files(
    small_gateway: str, upstream: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    import os

    def open_temp_files() -> int:
        fd_dir = Path("/proc/self/fd")
        return sum(1 for fd in fd_dir.iterdir() if "(deleted)" in os.path.realpath(fd))

    before = open_temp_files()
    big = images.noise_png(300, 300)
    for _ in range(3):
        post(small_gateway, files={"image": ("a.png", big), "prompt": (None, "x")})
        post(
            small_gateway, files={"image": ("a.png", big), "n": (None, "99"), "prompt": (None, "x")}
        )
    assert open_temp_files() == before
