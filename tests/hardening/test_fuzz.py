"""Fuzzing (bounded): field values, multipart structure and image bytes drawn by hypothesis.
Whatever arrives, the gateway answers below 500 in OpenAI's envelope, logs no traceback (the
autouse watch in tests/support/log_watch.py) and stays healthy."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config.catalog import KNOWN_PARAMS
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening import multipart as mp
from tests.support import images
from tests.support.constants import CLIENT_KEY

FUZZ = settings(
    max_examples=120,
    deadline=None,  # a shared 2-core box: time is bounded by max_examples, not per example
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

SAMPLES = [
    images.png(32, 32),
    images.png(32, 32, mode="RGBA"),
    images.jpeg(32, 24),
    images.webp(20, 20),
    images.mask_png(32, 32),
]
FIELD_NAMES = sorted(KNOWN_PARAMS | {"model", "prompt", "image", "image[]", "image[0]", "mask"})


@pytest.fixture
def http(gateway_url: str, upstream: FakeOpenAIUpstream) -> Iterator[httpx.Client]:
    headers = {"authorization": f"Bearer {CLIENT_KEY}"}
    with httpx.Client(base_url=gateway_url, headers=headers, timeout=30) as client:
        yield client
    assert httpx.get(gateway_url + "/healthz", timeout=10).status_code == 200
    models = httpx.get(gateway_url + "/v1/models", headers=headers, timeout=10)
    assert models.status_code == 200


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if response.status_code >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        param = body["error"]["param"]
        assert param is None or (isinstance(param, str) and len(param) <= 200)
    else:
        assert response.status_code == 200 and isinstance(body["data"], list)


def post(http: httpx.Client, body: bytes, content_type: str) -> httpx.Response:
    return http.post("/v1/images/edits", content=body, headers={"content-type": content_type})


field_value = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "0", "1", "-1", "10", "11", "1.5", "true", "auto", "png", "url"]),
    st.integers(-(10**12), 10**12).map(str),
    st.binary(max_size=40).map(lambda b: b.decode("latin-1")),
)
field_name = st.one_of(st.sampled_from(FIELD_NAMES), st.text(min_size=1, max_size=20))


@FUZZ
@given(
    fields=st.lists(st.tuples(field_name, field_value), max_size=8),
    image=st.sampled_from(SAMPLES),
)
def test_fuzz_field_values_never_5xx(
    http: httpx.Client, fields: list[tuple[str, str]], image: bytes
) -> None:
    parts = [mp.file("image", image), mp.text("prompt", "fuzz")]
    parts += [mp.text(name, value) for name, value in fields]
    check(post(http, mp.encode(parts), mp.content_type()))


header_bytes = st.binary(max_size=60).filter(lambda b: b"\r\n" not in b)
part = st.builds(
    mp.Part,
    name=st.one_of(st.none(), st.sampled_from([n.encode() for n in FIELD_NAMES]), header_bytes),
    data=st.one_of(st.sampled_from(SAMPLES), st.binary(max_size=200)),
    filename=st.one_of(st.none(), header_bytes),
    content_type=st.one_of(st.none(), st.sampled_from([b"image/png", b"text/plain"]), header_bytes),
    extra_headers=st.lists(header_bytes, max_size=3).map(tuple),
)
boundary = st.one_of(
    st.just(mp.BOUNDARY),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789'()+_,-./:=? ", min_size=1, max_size=75),
)


@FUZZ
@given(
    parts=st.lists(part, max_size=6),
    sent_boundary=boundary,
    declared_boundary=boundary,
    prefix=st.binary(max_size=30),
    suffix=st.binary(max_size=30),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=2000)),
)
def test_fuzz_multipart_structure_never_5xx(
    http: httpx.Client,
    parts: list[mp.Part],
    sent_boundary: str,
    declared_boundary: str,
    prefix: bytes,
    suffix: bytes,
    cut: int | None,
) -> None:
    body = prefix + mp.encode(parts, boundary=sent_boundary) + suffix
    if cut is not None:
        body = body[:cut]
    # Quoted, so the header itself stays legal HTTP (h11 refuses a trailing space).
    check(post(http, body, f'multipart/form-data; boundary="{declared_boundary}"'))


@FUZZ
@given(
    sample=st.sampled_from(SAMPLES),
    edits=st.lists(
        st.tuples(st.integers(0, 10_000), st.binary(min_size=1, max_size=8)), max_size=4
    ),
    cut=st.one_of(st.none(), st.integers(min_value=0, max_value=10_000)),
    as_mask=st.booleans(),
)
def test_fuzz_image_bytes_never_5xx(
    http: httpx.Client,
    sample: bytes,
    edits: list[tuple[int, bytes]],
    cut: int | None,
    as_mask: bool,
) -> None:
    data = bytearray(sample)
    for offset, patch in edits:
        at = offset % max(len(data), 1)
        data[at : at + len(patch)] = patch
    mutated = bytes(data[:cut] if cut is not None else data)
    if as_mask:
        parts = [mp.file("image", images.png(32, 32)), mp.file("mask", mutated)]
    else:
        parts = [mp.file("image", mutated)]
    parts.append(mp.text("prompt", "fuzz"))
    check(post(http, mp.encode(parts), mp.content_type()))
