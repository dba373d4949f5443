"""Auth is decided on the raw ASGI path, deny by default: no spelling of the edit path, no forged
Host or rewrite header, no odd Authorization header gets an edit past it."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from app.auth import ClientAuthMiddleware
from tests.conftest import CLIENT_KEY
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening import multipart as mp
from tests.hardening.raw_http import connect, head, read_response
from tests.support import images

TARGETS = [
    "/v1/images/edits",
    "//v1/images/edits",
    "///v1/images/edits",
    "/v1//images/edits",
    "/v1/images/edits/",
    "/V1/images/edits",
    "/v1/IMAGES/EDITS",
    "/v1/images%2Fedits",
    "/v1%2Fimages%2Fedits",
    "/v1/images%2fedits",
    "/%2Fv1/images/edits",
    "/%76%31/images/edits",
    "/v1/images/./edits",
    "/v1/images/../images/edits",
    "/healthz/../v1/images/edits",
    "/healthz/..%2Fv1%2Fimages%2Fedits",
    "/healthz%2F..%2Fv1%2Fimages%2Fedits",
    "/readyz/../v1/images/edits",
    "/v1/images/edits?x=/healthz",
    "/v1/images/edits;/healthz",
    "/v1/images/edits%3B/healthz",
    "/v1/images/edits%20",
    "http://127.0.0.1/v1/images/edits",
    "http://gw/healthz/../v1/images/edits",
    "/v1/models",
]

FORGED_HEADERS = [
    [("Host", "localhost")],
    [("Host", "127.0.0.1")],
    [("Host", "evil.example/healthz")],
    [("X-Forwarded-Host", "localhost"), ("X-Forwarded-For", "127.0.0.1")],
    [("X-Original-URL", "/healthz")],
    [("X-Rewrite-URL", "/healthz")],
    [("X-Forwarded-Prefix", "/healthz")],
    [("X-Real-IP", "127.0.0.1")],
]

BAD_AUTHORIZATION = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Basic " + CLIENT_KEY,
    "Token " + CLIENT_KEY,
    "Bearer " + CLIENT_KEY[:-1],
    "Bearer " + CLIENT_KEY + "x",
    "Bearer " + CLIENT_KEY.upper(),
    "Bearer" + CLIENT_KEY,
    "Bearer sk-test-upstream-AAAA1111aaaa",  # an upstream key is not a client key
]


def send(url: str, target: str, headers: list[tuple[str, str]], host: str = "gw") -> int:
    body = mp.encode([mp.file("image", images.png()), mp.text("prompt", "x")])
    all_headers = [
        ("Content-Type", mp.content_type()),
        ("Content-Length", str(len(body))),
        *headers,
    ]
    with connect(url) as sock:
        sock.sendall(head("POST", target, all_headers, host=host) + body)
        return read_response(sock).status


@pytest.mark.parametrize("target", TARGETS)
def test_auth_no_spelling_of_a_path_skips_auth(
    target: str, gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    assert send(gateway_url, target, []) == 401
    assert upstream.edits == []


@pytest.mark.parametrize("headers", FORGED_HEADERS, ids=lambda h: h[0][0] + ":" + h[0][1])
def test_auth_forged_host_or_rewrite_headers_do_not_skip_auth(
    headers: list[tuple[str, str]], gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    host = next((value for name, value in headers if name == "Host"), "gw")
    others = [(name, value) for name, value in headers if name != "Host"]
    assert send(gateway_url, "/v1/images/edits", others, host=host) == 401
    assert upstream.edits == []


@pytest.mark.parametrize("authorization", BAD_AUTHORIZATION)
def test_auth_wrong_or_malformed_key_is_refused(
    authorization: str | None, gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    headers = [] if authorization is None else [("Authorization", authorization)]
    assert send(gateway_url, "/v1/images/edits", headers) == 401
    assert upstream.edits == []


def test_auth_control_character_in_header_is_refused_by_the_http_parser(
    gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    headers = [("Authorization", "Bearer \x00" + CLIENT_KEY)]
    assert send(gateway_url, "/v1/images/edits", headers) == 400
    assert upstream.edits == []


def test_auth_second_authorization_header_cannot_smuggle_a_key(
    gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    headers = [("Authorization", "Bearer wrong"), ("Authorization", f"Bearer {CLIENT_KEY}")]
    assert send(gateway_url, "/v1/images/edits", headers) == 401
    assert upstream.edits == []


def test_auth_valid_key_on_the_canonical_path_is_accepted(
    gateway_url: str, upstream: FakeOpenAIUpstream
) -> None:
    # The control case: the same request with the key goes through.
    assert send(gateway_url, "/v1/images/edits", [("Authorization", f"Bearer {CLIENT_KEY}")]) == 200
    assert len(upstream.edits) == 1


def test_auth_keys_are_held_only_as_digests() -> None:
    key = "igw-plaintext-must-not-be-kept-0123"
    middleware = ClientAuthMiddleware(
        lambda *_: None,  # type: ignore[arg-type, return-value]
        keys=(SecretStr(key),),
        allow_anonymous=False,
    )
    seen: list[object] = []

    def walk(value: object, depth: int = 0) -> None:
        seen.append(value)
        if depth > 4:
            return
        if isinstance(value, dict):
            for item in value.values():
                walk(item, depth + 1)
        elif isinstance(value, list | tuple | set | frozenset):
            for item in value:
                walk(item, depth + 1)

    walk(vars(middleware))
    for value in seen:
        assert not (isinstance(value, str) and key in value)
        assert not (isinstance(value, bytes) and key.encode() in value)
        assert not isinstance(value, SecretStr)
