"""The SSRF guard: scheme, host allowlist, port allowlist, resolved addresses in every form they
can be written in (IPv4 carried inside IPv6 included), and pinning to the vetted address.

Fetches through the guard (redirects, a Location httpx cannot parse, no connection made) are in
tests/unit/upstream/test_fetch.py, tests/unit/upstream/test_bfl_upstream.py and
tests/e2e/test_ssrf.py.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from app.config.settings import FetchConfig
from app.upstream.url_guard import PinnedUrl, RefusedUrl, UrlGuard, host_allowed, is_public


def resolver_to(*addresses: str):  # type: ignore[no-untyped-def]
    async def resolve(host: str, port: int) -> list[str]:
        return list(addresses)

    return resolve


async def never(host: str, port: int) -> list[str]:
    raise AssertionError("a refused URL must not even be resolved")


def check(guard: UrlGuard, url: str) -> PinnedUrl:
    return asyncio.run(guard.check(url))


# Each written as DNS could answer it, or a URL could carry it literally.
NON_PUBLIC = [
    "127.0.0.1",
    "10.1.2.3",
    "192.168.0.10",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # CGNAT
    "0.0.0.0",
    "224.0.0.1",
    "::1",
    "::",
    "fd00::1",
    "fe80::1",
    "fec0::1",  # site-local (deprecated; Python calls it global)
    "ff02::1",
    # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:127.0.0.1",
    "::ffff:169.254.169.254",
    # IPv4-compatible
    "::127.0.0.1",
    "::a9fe:a9fe",
    "::10.0.0.1",
    # IPv4-translated (SIIT)
    "::ffff:0:7f00:1",
    "::ffff:0:a9fe:a9fe",
    # NAT64 well-known prefix
    "64:ff9b::a9fe:a9fe",
    "64:ff9b::7f00:1",
    "64:ff9b::a00:1",
    # NAT64 local-use prefix: refused whatever it carries
    "64:ff9b:1::a9fe:a9fe",
    "64:ff9b:1:808:8:800::",
    # 6to4
    "2002:a9fe:a9fe::",
    "2002:7f00:1::1",
    "2002:a00:1:1::1",
    # Teredo: client 127.0.0.1 (last 32 bits XOR 0xffffffff), client 169.254.169.254, and one
    # with a public client, refused all the same
    "2001:0:4136:e378:8000:63bf:80ff:fffe",
    "2001:0:4136:e378:8000:63bf:5601:5601",
    "2001:0:4136:e378:8000:63bf:f7f7:f7f7",
]

PUBLIC = [
    "8.8.8.8",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "64:ff9b::808:808",  # NAT64 to a public address: how an IPv6-only network reaches IPv4
    "2002:808:808::1",
]


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
    guard = UrlGuard(("*.bfl.ai",), allowed_ports=(443, 8443), resolver=resolver_to("8.8.8.8"))
    pinned = check(guard, "https://api.us1.bfl.ai:8443/v1/get_result?id=abc")
    assert str(pinned.url) == "https://8.8.8.8:8443/v1/get_result?id=abc"
    assert pinned.headers == {"host": "api.us1.bfl.ai:8443"}
    assert pinned.extensions == {"sni_hostname": "api.us1.bfl.ai"}


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_url_guard_refuses_hosts_resolving_to_non_public_addresses(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    guard = UrlGuard(("*.bfl.ai",), resolver=resolver_to("8.8.8.8", address))
    with pytest.raises(RefusedUrl, match="non-public"):
        check(guard, "https://api.bfl.ai/x")


@pytest.mark.parametrize("address", [a for a in NON_PUBLIC if ":" in a])
def test_url_guard_refuses_ipv6_literals_carrying_non_public_addresses(address: str) -> None:
    guard = UrlGuard(("*",), resolver=never)
    with pytest.raises(RefusedUrl, match="non-public"):
        check(guard, f"https://[{address}]/x.png")
    with pytest.raises(RefusedUrl, match="non-public"):
        check(guard, f"https://[{address}]:443/x.png")


@pytest.mark.parametrize("address", PUBLIC)
def test_url_guard_lets_public_addresses_through_in_every_form(address: str) -> None:
    assert is_public(ipaddress.ip_address(address))
    expected = ipaddress.ip_address(address)
    pinned = check(UrlGuard(("*.bfl.ai",), resolver=resolver_to(address)), "https://api.bfl.ai/x")
    assert ipaddress.ip_address(pinned.url.host) == expected
    literal = f"[{address}]" if ":" in address else address
    pinned = check(UrlGuard(("*",), resolver=never), f"https://{literal}/x")
    assert ipaddress.ip_address(pinned.url.host) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://api.bfl.ai:22/x",
        "https://api.bfl.ai:0/x",
        "https://api.bfl.ai:6379/x",
        "https://api.bfl.ai:65536/x",
        "https://api.bfl.ai:99999/x",
        "https://api.bfl.ai:99999999999999999999999/x",
        "https://[64:ff9b::808:808]:8080/x",
    ],
)
def test_url_guard_refuses_ports_outside_the_allowlist_before_resolving(url: str) -> None:
    guard = UrlGuard(("*.bfl.ai", "*"), resolver=never)
    with pytest.raises(RefusedUrl, match="is not an allowed port") as caught:
        check(guard, url)
    assert len(str(caught.value)) < 60


def test_url_guard_bad_port_with_the_system_resolver_is_refused_not_an_overflow() -> None:
    # getaddrinfo raises OverflowError for a port past 65535: the port is refused before that.
    guard = UrlGuard(("localhost",))
    with pytest.raises(RefusedUrl, match="is not an allowed port"):
        check(guard, "https://localhost:99999/x")


def test_url_guard_ports_are_configurable_and_implied_by_the_scheme() -> None:
    config = FetchConfig(allowed_hosts=("*.bfl.ai",), allowed_ports=(8443,), allow_http=True)
    guard = UrlGuard.from_config(config, resolver=resolver_to("8.8.8.8"))
    assert str(check(guard, "https://api.bfl.ai:8443/x").url) == "https://8.8.8.8:8443/x"
    for url in ("https://api.bfl.ai/x", "http://api.bfl.ai/x", "https://api.bfl.ai:443/x"):
        with pytest.raises(RefusedUrl, match=r"port (443|80) is not"):
            check(guard, url)
    extra = UrlGuard.from_config(config, extra_ports=(443,), resolver=resolver_to("8.8.8.8"))
    assert check(extra, "https://api.bfl.ai/x").url.host == "8.8.8.8"
    default = UrlGuard.from_config(FetchConfig(allow_http=True), resolver=resolver_to("8.8.8.8"))
    assert check(default, "http://api.bfl.ai/x").url.port is None  # 80
    assert check(default, "https://api.bfl.ai:80/x").url.port == 80


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
    guard = UrlGuard(("*.bfl.ai",), resolver=never)
    with pytest.raises(RefusedUrl, match=reason):
        check(guard, url)


@pytest.mark.parametrize("host", ["2130706433", "0x7f.1", "127.1", "0"])
def test_url_guard_odd_ipv4_spellings_resolve_to_what_they_are(host: str) -> None:
    # Not IP literals to httpx or ipaddress, but getaddrinfo reads them as 127.0.0.1 (or
    # 0.0.0.0): the system resolver's answer is what is checked.
    with pytest.raises(RefusedUrl, match="non-public"):
        check(UrlGuard(("*",)), f"https://{host}/x")


def test_url_guard_refuses_ipv6_zone_ids() -> None:
    guard = UrlGuard(("*",), resolver=never)
    with pytest.raises(RefusedUrl, match="names a network interface"):
        check(guard, "https://[2606:4700::1%25eth0]/x")


def test_url_guard_messages_bound_and_escape_what_the_url_says() -> None:
    guard = UrlGuard(("*.bfl.ai",), resolver=never)
    with pytest.raises(RefusedUrl) as caught:
        check(guard, "https://" + "a" * 60 + "." + "b" * 3000 + ".example/x")
    assert len(str(caught.value)) < 200 and "..." in str(caught.value)
    with pytest.raises(RefusedUrl) as caught:
        check(guard, "https://xn--bcher-kva.example/x")  # shown decoded, escaped by repr
    assert "bücher.example" in str(caught.value)


def test_url_guard_loopback_literal_needs_explicit_permission() -> None:
    strict = UrlGuard(("127.0.0.1",), allowed_ports=(8080,), allow_http=True)
    with pytest.raises(RefusedUrl, match="non-public"):
        check(strict, "http://127.0.0.1:8080/x")
    lab = UrlGuard(
        ("127.0.0.1",), allowed_ports=(8080,), allow_http=True, allow_private_addresses=True
    )
    assert str(check(lab, "http://127.0.0.1:8080/x").url) == "http://127.0.0.1:8080/x"


def test_url_guard_unresolvable_host_is_refused() -> None:
    async def fails(host: str, port: int) -> list[str]:
        raise OSError("no such host")

    guard = UrlGuard(("*.bfl.ai",), resolver=fails)
    with pytest.raises(RefusedUrl, match="does not resolve"):
        check(guard, "https://nowhere.bfl.ai/x")


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/b.png", "https://images.example/b.png"),
        ("b.png", "https://images.example/dir/b.png"),
        ("//other.example/c.png", "https://other.example/c.png"),
        ("https://[::127.0.0.1]:8443/", "https://[::127.0.0.1]:8443/"),
    ],
)
def test_url_guard_redirect_joins_the_location(location: str, expected: str) -> None:
    guard = UrlGuard(("*",))
    assert guard.redirect("https://images.example/dir/a.png", location) == expected


@pytest.mark.parametrize(
    "location", ["https://[::1/x", "https://a.example:port/", "https://exa mple.com/\x00"]
)
def test_url_guard_redirect_to_an_unparseable_location_is_refused(location: str) -> None:
    guard = UrlGuard(("*",))
    with pytest.raises(RefusedUrl, match="cannot be parsed"):
        guard.redirect("https://images.example/a.png", location)
