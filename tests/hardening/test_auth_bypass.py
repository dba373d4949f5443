"""Auth is decided on the raw ASGI path, deny by default: no spelling of the edit path, no forged
Host or rewrite header, no odd Authorization header gets an edit past it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import SecretStr

from app.main import create_app
from app.server.auth import ClientAuthMiddleware
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening import multipart as mp
from tests.hardening.raw_http import RawResponse, connect, head, read_response
from tests.support import images
from tests.support.constants import CLIENT_KEY
from tests.support.gateway_env import gateway_settings
from tests.support.servers import serve_in_thread

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


@pytest.fixture(scope="module")
def gateway_url(refusing_gateway_url: str) -> str:
    # Every test here is refused before an upstream key is used (or succeeds): one gateway serves
    # the module.
    return refusing_gateway_url


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


ADMIN_KEY = "igw-admin-key-bypass-test-31337"
METRICS_TOKEN = "igw-metrics-token-bypass-test-99"


@pytest.fixture(scope="module")
def guarded_extras_url(fake_upstream: FakeOpenAIUpstream) -> Iterator[str]:
    """A gateway whose /metrics takes its own token and whose /admin/* takes admin keys."""
    settings = gateway_settings(
        fake_upstream.url,
        GATEWAY_ADMIN_KEYS=ADMIN_KEY,
        GATEWAY_METRICS_TOKEN=METRICS_TOKEN,
    )
    with serve_in_thread(create_app(settings)) as url:
        yield url


def get(url: str, target: str, key: str | None) -> RawResponse:
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    with connect(url) as sock:
        sock.sendall(head("GET", target, headers))
        return read_response(sock)


METRICS_SPELLINGS = ["/metrics", "//metrics", "/metrics/", "/METRICS", "/%6detrics", "/metrics?x"]


@pytest.mark.parametrize("target", METRICS_SPELLINGS)
@pytest.mark.parametrize("key", [None, "wrong", CLIENT_KEY, ADMIN_KEY], ids=str)
def test_auth_metrics_needs_its_own_token_in_every_spelling(
    guarded_extras_url: str, target: str, key: str | None
) -> None:
    response = get(guarded_extras_url, target, key)
    assert response.status in (401, 404)
    assert b"gateway_requests" not in response.body


def test_auth_metrics_token_scrapes(guarded_extras_url: str) -> None:
    response = get(guarded_extras_url, "/metrics", METRICS_TOKEN)
    assert response.status == 200 and b"gateway_requests_in_flight" in response.body
    # The metrics token is not a client key.
    assert get(guarded_extras_url, "/v1/models", METRICS_TOKEN).status == 401


ADMIN_SPELLINGS = [
    "/admin/keys",
    "/admin/",
    "//admin/keys",
    "/admin//keys",
    "/ADMIN/keys",
    "/%61dmin/keys",
    "/admin%2Fkeys",
    "/v1/../admin/keys",
    "/healthz/../admin/keys",
]


@pytest.mark.parametrize("target", ADMIN_SPELLINGS)
@pytest.mark.parametrize("key", [None, "wrong", CLIENT_KEY, METRICS_TOKEN], ids=str)
def test_auth_admin_paths_refuse_everything_but_an_admin_key(
    guarded_extras_url: str, target: str, key: str | None
) -> None:
    # No spelling of an admin path reaches an admin route without an admin key: the request is
    # refused (401) or lands on no route at all (404).
    assert get(guarded_extras_url, target, key).status in (401, 404)


def test_auth_admin_key_is_not_a_client_key(guarded_extras_url: str) -> None:
    assert get(guarded_extras_url, "/v1/models", ADMIN_KEY).status == 401


@pytest.mark.parametrize("target", ["/metrics/", "/v1/models/", "/v1/images/edits/", "/healthz/"])
def test_auth_no_redirect_is_built_from_a_forged_host(gateway_url: str, target: str) -> None:
    with connect(gateway_url) as sock:
        headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
        sock.sendall(head("GET", target, headers, host="evil.example"))
        response = read_response(sock)
    assert response.status in (401, 404, 405)
    assert "location" not in response.headers
