"""The SSRF guard for URLs an upstream hands back (BFL polling and result URLs).

A URL is fetched only if its scheme and host are allowed, and its host resolves, once, to public
addresses; the fetch then goes to that resolved address (the Host header and TLS name stay the
host's), so a second DNS answer cannot point the gateway at something else.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

# host, port -> the addresses it resolves to.
Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class RefusedUrl(Exception):
    """The URL may not be fetched; the message names why, without secrets (URLs carry none)."""


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


def _public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    # is_global is False for loopback, private, link-local (cloud metadata), CGNAT and reserved.
    return address.is_global and not address.is_multicast


class UrlGuard:
    def __init__(
        self,
        allowed_hosts: tuple[str, ...],
        *,
        allow_http: bool = False,
        allow_private_addresses: bool = False,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._allowed_hosts = allowed_hosts
        self._allow_http = allow_http
        self._allow_private = allow_private_addresses
        self._resolve = resolver

    async def check(self, raw: str) -> PinnedUrl:
        """The URL pinned to a vetted address, or RefusedUrl before any connection is made."""
        try:
            url = httpx.URL(raw)
        except (httpx.InvalidURL, TypeError):
            raise RefusedUrl("it is not a valid URL") from None
        schemes = ("https", "http") if self._allow_http else ("https",)
        if url.scheme not in schemes:
            raise RefusedUrl(f"its scheme {url.scheme!r} is not allowed (use {schemes[0]})")
        if url.userinfo:
            raise RefusedUrl("it carries credentials")
        host = url.host
        if not host or not host_allowed(host, self._allowed_hosts):
            raise RefusedUrl(f"its host {host[:100]!r} is not in the allowed hosts")
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            self._check_address(host, literal)
            return PinnedUrl(url)
        try:
            async with asyncio.timeout(10):
                addresses = await self._resolve(host, port)
        except (OSError, TimeoutError):
            raise RefusedUrl(f"its host {host!r} does not resolve") from None
        if not addresses:
            raise RefusedUrl(f"its host {host!r} does not resolve")
        parsed = [ipaddress.ip_address(address.split("%", 1)[0]) for address in addresses]
        for address in parsed:
            self._check_address(host, address)
        pinned = str(parsed[0])
        return PinnedUrl(
            url.copy_with(host=pinned),
            headers={"host": url.netloc.decode("ascii")},
            extensions={"sni_hostname": host},
        )

    def _check_address(self, host: str, address: IPAddress) -> None:
        if not self._allow_private and not _public(address):
            raise RefusedUrl(f"its host {host!r} resolves to a non-public address")
