"""The SSRF guard: scheme, host allowlist, resolved addresses, and pinning to the vetted address."""

from __future__ import annotations

import asyncio

import pytest

from app.upstream.url_guard import RefusedUrl, UrlGuard, host_allowed


def resolver_to(*addresses: str):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


def check(guard: UrlGuard, url: str):  # type: ignore[no-untyped-def]
    return asyncio.run(guard.check(url))


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("api.bfl.ai", True),
        ("api.us1.bfl.ai", True),
        ("DELIVERY-EU1.BFL.AI", True),
        ("bfl.ai", False),  # the wildcard covers subdomains only
        ("evilbfl.ai", False),
        ("api.bfl.ai.evil.com", False),
        ("127.0.0.1", False),
    ],
)
def test_host_allowed_wildcard_matches_subdomains_only(host: str, allowed: bool) -> None:
    assert host_allowed(host, ("*.bfl.ai",)) is allowed


def test_url_guard_pinned_url_goes_to_the_resolved_address() -> None:
    guard = UrlGuard(("*.bfl.ai",), resolver=resolver_to("8.8.8.8"))
    pinned = check(guard, "https://api.us1.bfl.ai:8443/v1/get_result?id=abc")
    assert str(pinned.url) == "https://8.8.8.8:8443/v1/get_result?id=abc"
    assert pinned.headers == {"host": "api.us1.bfl.ai:8443"}
    assert pinned.extensions == {"sni_hostname": "api.us1.bfl.ai"}


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "192.168.0.10",
        "169.254.169.254",
        "::1",
        "::ffff:10.0.0.1",
        "fd00::1",
    ],
)
def test_url_guard_refuses_hosts_resolving_to_non_public_addresses(address: str) -> None:
    guard = UrlGuard(("*.bfl.ai",), resolver=resolver_to("8.8.8.8", address))
    with pytest.raises(RefusedUrl, match="non-public"):
        check(guard, "https://api.bfl.ai/x")


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://api.bfl.ai/x", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("https://user:pw@api.bfl.ai/x", "credentials"),
        ("https://metadata.google.internal/x", "not in the allowed hosts"),
        ("https://169.254.169.254/latest/meta-data", "not in the allowed hosts"),
        ("not a url", "scheme"),
    ],
)
def test_url_guard_refuses_before_resolving(url: str, reason: str) -> None:
    async def never(host: str, port: int) -> list[str]:
        raise AssertionError("a refused URL must not even be resolved")

    guard = UrlGuard(("*.bfl.ai",), resolver=never)
    with pytest.raises(RefusedUrl, match=reason):
        check(guard, url)


def test_url_guard_loopback_literal_needs_explicit_permission() -> None:
    strict = UrlGuard(("127.0.0.1",), allow_http=True)
    with pytest.raises(RefusedUrl, match="non-public"):
        check(strict, "http://127.0.0.1:8080/x")
    lab = UrlGuard(("127.0.0.1",), allow_http=True, allow_private_addresses=True)
    assert str(check(lab, "http://127.0.0.1:8080/x").url) == "http://127.0.0.1:8080/x"


def test_url_guard_unresolvable_host_is_refused() -> None:
    async def fails(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    guard = UrlGuard(("*.bfl.ai",), resolver=fails)
    with pytest.raises(RefusedUrl, match="does not resolve"):
        check(guard, "https://nowhere.bfl.ai/x")
