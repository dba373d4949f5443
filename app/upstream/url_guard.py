"""The SSRF guard: the one gate for every URL the gateway fetches without having chosen it (BFL
polling and result URLs, upstream result URLs, client-sent image URLs), on every redirect hop.

A URL is fetched only if its scheme, host and port are allowed and its host resolves, once, to
public addresses; the fetch then goes to that resolved address (the Host header and TLS name stay
the host's), so a second DNS answer cannot point the gateway at something else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:  # settings import the BFL dialect, which imports this guard
    from app.config.settings import UrlGuardConfig

# host, port -> the addresses it resolves to.
Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_V6 = ipaddress.IPv6Network
# IPv6 prefixes whose last 32 bits are an IPv4 address the packets end up at (or that a
# translator on the path turns them into); the decision is that IPv4 address's.
_CARRY_LOW_32 = (
    _V6("::ffff:0:0/96"),  # IPv4-mapped: a dual-stack socket connects to the IPv4 address
    _V6("::/96"),  # IPv4-compatible (deprecated by RFC 4291), `::` and `::1` included
    _V6("::ffff:0:0:0/96"),  # IPv4-translated (SIIT, RFC 2765)
    _V6("64:ff9b::/96"),  # NAT64 well-known prefix (RFC 6052)
)
# Refused whatever they carry.
_NEVER = (
    # Local-use NAT64 (RFC 8215): where the IPv4 address sits depends on the operator's prefix
    # length, so it cannot be checked; and the prefix is not globally reachable.
    _V6("64:ff9b:1::/48"),
    # Teredo (RFC 4380): packets go through whichever relay to an IPv4 host behind a NAT; not
    # globally reachable (inside 2001::/23), and no image host lives there.
    _V6("2001::/32"),
)


class RefusedUrl(Exception):
    """The URL may not be fetched; the message names why, without secrets (URLs carry none), and
    shows at most a bounded, escaped piece of anything the URL's author wrote."""


@dataclass(frozen=True, slots=True)
class PinnedUrl:
    """Where to connect, and what the request must still say about the original host."""

    url: httpx.URL
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, str] = field(default_factory=dict)


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return [str(info[4][0]) for info in infos]


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """`*.example.com` matches any subdomain of example.com (not itself); `*` matches any host
    (the address checks still apply); others match exactly."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*":
            return True
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def is_public(address: IPAddress) -> bool:
    """True for a unicast address on the public internet, in every form it can be written in."""
    if isinstance(address, ipaddress.IPv6Address):
        if any(address in network for network in _NEVER):
            return False
        carried = _carried_ipv4(address)
        if carried is not None:
            # Python's own IPv6 tables for these prefixes differ between versions; the IPv4
            # address they lead to is what counts.
            return _public_ipv4(carried)
        return address.is_global and not address.is_multicast and not address.is_site_local
    return _public_ipv4(address)


def _public_ipv4(address: ipaddress.IPv4Address) -> bool:
    # is_global is False for loopback, private, link-local (cloud metadata), CGNAT, this-network
    # (0/8), documentation, benchmarking, reserved and broadcast.
    return address.is_global and not address.is_multicast


def _carried_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    sixtofour = address.sixtofour  # 6to4 (2002::/16): the relay delivers to this IPv4 host
    if sixtofour is not None:
        return sixtofour
    if any(address in network for network in _CARRY_LOW_32):
        return ipaddress.IPv4Address(int(address) & 0xFFFF_FFFF)
    return None


def _shown(text: str, limit: int = 100) -> str:
    """Part of a URL for a message: escaped by repr, and bounded."""
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


class UrlGuard:
    def __init__(
        self,
        allowed_hosts: tuple[str, ...],
        *,
        allowed_ports: Iterable[int] = (80, 443),
        allow_http: bool = False,
        allow_private_addresses: bool = False,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._allowed_hosts = allowed_hosts
        self._allowed_ports = frozenset(allowed_ports)
        self._allow_http = allow_http
        self._allow_private = allow_private_addresses
        self._resolve = resolver

    @classmethod
    def from_config(
        cls,
        config: UrlGuardConfig,
        *,
        extra_hosts: Iterable[str] = (),
        extra_ports: Iterable[int] = (),
        resolver: Resolver = system_resolver,
    ) -> UrlGuard:
        return cls(
            (*config.allowed_hosts, *extra_hosts),
            allowed_ports=(*config.allowed_ports, *extra_ports),
            allow_http=config.allow_http,
            allow_private_addresses=config.allow_private_addresses,
            resolver=resolver,
        )

    async def check(self, raw: str) -> PinnedUrl:
        """The URL pinned to a vetted address, or RefusedUrl before any connection is made."""
        try:
            url = httpx.URL(raw)
        except (httpx.InvalidURL, TypeError):
            raise RefusedUrl("it is not a valid URL") from None
        schemes = ("https", "http") if self._allow_http else ("https",)
        if url.scheme not in schemes:
            raise RefusedUrl(
                f"its scheme {_shown(url.scheme, 20)} is not allowed (use {schemes[0]})"
            )
        if url.userinfo:
            raise RefusedUrl("it carries credentials")
        host = url.host
        if not host or not host_allowed(host, self._allowed_hosts):
            raise RefusedUrl(f"its host {_shown(host)} is not in the allowed hosts")
        # Checked before the name is resolved: getaddrinfo raises OverflowError past 65535.
        # (`is None`, not `or`: port 0 is written, not implied.)
        port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
        if port not in self._allowed_ports:
            raise RefusedUrl(f"its port {str(port)[:12]} is not an allowed port")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if isinstance(literal, ipaddress.IPv6Address) and literal.scope_id:
                # `[addr%25eth0]`: no URL from elsewhere has a reason to pick our interface.
                raise RefusedUrl(f"its host {_shown(host)} names a network interface")
            self._check_address(host, literal)
            return PinnedUrl(url)
        try:
            async with asyncio.timeout(10):
                addresses = await self._resolve(host, port)
        except (OSError, TimeoutError, ValueError):  # ValueError: UnicodeError for a bad label
            raise RefusedUrl(f"its host {_shown(host)} does not resolve") from None
        if not addresses:
            raise RefusedUrl(f"its host {_shown(host)} does not resolve")
        parsed = [ipaddress.ip_address(address.split("%", 1)[0]) for address in addresses]
        for address in parsed:
            self._check_address(host, address)
        pinned = str(parsed[0])
        return PinnedUrl(
            url.copy_with(host=pinned),
            headers={"host": url.netloc.decode("ascii")},
            extensions={"sni_hostname": host},
        )

    def redirect(self, url: str, location: str) -> str:
        """Where a redirect from `url` points, for `check` to vet as the next hop."""
        try:
            return str(httpx.URL(url).join(location))
        except (httpx.InvalidURL, TypeError):
            raise RefusedUrl("it redirected to a URL that cannot be parsed") from None

    async def send(
        self,
        client: httpx.AsyncClient,
        pinned: PinnedUrl,
        *,
        headers: Mapping[str, str] | None = None,
        timeouts: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """GET a pinned URL at its vetted address, streamed: the caller reads and closes the
        response. Redirects are never followed here: a 3xx comes back, and its Location goes
        through `redirect` and `check` like any other URL."""
        request = client.build_request(
            "GET",
            pinned.url,
            headers={**(headers or {}), **pinned.headers},
            extensions=pinned.extensions,
            timeout=timeouts if timeouts is not None else client.timeout,
        )
        try:
            return await client.send(request, stream=True, follow_redirects=False)
        except httpx.InvalidURL:
            # httpx parses a 3xx's Location even when it does not follow it, and one it cannot
            # turn into a URL (`https:\\host\x`) raises InvalidURL, which is no httpx.HTTPError.
            raise RefusedUrl("it redirected to a URL that cannot be parsed") from None

    def _check_address(self, host: str, address: IPAddress) -> None:
        if not self._allow_private and not is_public(address):
            raise RefusedUrl(f"its host {_shown(host)} resolves to a non-public address")
