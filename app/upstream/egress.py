"""Which egress proxy, if any, a request to an upstream goes through.

By default the environment's, read once at startup the way httpx's `trust_env` reads it:
HTTPS_PROXY for https URLs, HTTP_PROXY for http ones, ALL_PROXY for both (a lower-case name wins
over the upper-case one), NO_PROXY listing hosts that go direct with their subdomains (`*`: every
host). An upstream's own `proxy:` replaces the environment for that upstream. Client-supplied image
URLs go direct unless `image_urls.proxy` names a proxy for them.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass

import httpx
from pydantic import SecretStr

# The variables an egress proxy is read from, lower-case first (as curl and httpx read them).
PROXY_VARIABLES = (
    "https_proxy",
    "HTTPS_PROXY",
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
    "no_proxy",
    "NO_PROXY",
)


# A host name or IPv4 address (httpx checks IPv6 ones itself).
_HOST = re.compile(r"[A-Za-z0-9._-]+")


class ProxyUrlError(ValueError):
    """A proxy URL the gateway cannot use; the message never repeats credentials."""


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: https URLs go through it with CONNECT (the certificate is still verified
    against the upstream's name), http URLs are sent to it whole."""

    url: str  # http://host:port, never with credentials
    credentials: SecretStr | None = None  # "user:password"

    @classmethod
    def parse(cls, raw: str, credentials: str | None = None) -> Proxy:
        """`raw` may carry `user:password@` (as the environment's variables do) unless
        `credentials` are given apart."""
        text = raw.strip()
        if "://" not in text:
            text = "http://" + text  # what curl and httpx assume for `host:port`
        try:
            url = httpx.URL(text)
        except (httpx.InvalidURL, TypeError):
            raise ProxyUrlError("is not a valid URL") from None
        if url.scheme != "http":
            raise ProxyUrlError(
                f"only http:// proxies are supported (https upstreams go through them with "
                f"CONNECT), got {url.scheme}://"
            )
        if not url.host:
            raise ProxyUrlError("names no host")
        if not (_HOST.fullmatch(url.host) or ":" in url.host) or (url.port or 80) > 65535:
            raise ProxyUrlError("is not a valid URL")
        if url.path not in ("", "/") or url.query or url.fragment:
            raise ProxyUrlError("must be http://host:port, without a path")
        inline = (
            f"{url.username}:{url.password}" if url.userinfo else None
        )  # percent-decoded by httpx
        if inline is not None and credentials is not None:
            raise ProxyUrlError("carries credentials; give them in one place only")
        port = url.port or 80
        host = f"[{url.host}]" if ":" in url.host else url.host
        secret = credentials if credentials is not None else inline
        return cls(f"http://{host}:{port}", SecretStr(secret) if secret else None)

    def authorization(self) -> str | None:
        """The Proxy-Authorization header's value, if the proxy takes credentials."""
        if self.credentials is None:
            return None
        token = base64.b64encode(self.credentials.get_secret_value().encode("utf-8"))
        return "Basic " + token.decode("ascii")

    def secrets(self) -> list[str]:
        """What a log line must never show."""
        if self.credentials is None:
            return []
        value = self.credentials.get_secret_value()
        authorization = self.authorization()
        assert authorization is not None
        return [value, value.partition(":")[2], authorization.removeprefix("Basic ")]


class Egress:
    """Chooses the proxy for each request: by the URL's scheme, unless NO_PROXY matches its host."""

    def __init__(self, proxies: Mapping[str, Proxy] | None = None, no_proxy: str = "") -> None:
        self._proxies = dict(proxies or {})
        self._no_proxy = no_proxy

    @classmethod
    def direct(cls) -> Egress:
        return cls()

    @classmethod
    def through(cls, proxy: Proxy) -> Egress:
        return cls({"http": proxy, "https": proxy})

    @classmethod
    def from_environment(cls, env: Mapping[str, str]) -> Egress:
        """Raises ProxyUrlError naming the variable at fault (its value is never repeated)."""
        proxies: dict[str, Proxy] = {}
        for scheme in ("all", "http", "https"):
            name, value = _variable(env, f"{scheme}_proxy")
            if value:
                try:
                    proxy = Proxy.parse(value)
                except ProxyUrlError as exc:
                    raise ProxyUrlError(f"{name}: {exc}") from None
                if scheme == "all":
                    proxies = {"http": proxy, "https": proxy}
                else:
                    proxies[scheme] = proxy
        return cls(proxies, _variable(env, "no_proxy")[1])

    @property
    def proxies(self) -> list[Proxy]:
        return list(self._proxies.values())

    def proxy_for(self, request: httpx.Request) -> Proxy | None:
        proxy = self._proxies.get(request.url.scheme)
        if proxy is not None and self._no_proxy and _bypassed(request, self._no_proxy):
            return None
        return proxy


def _bypassed(request: httpx.Request, no_proxy: str) -> bool:
    """NO_PROXY as curl and httpx read it: `example.com` (or `.example.com`, `*.example.com`)
    covers the host and its subdomains, an address itself, `host:port` one port, `*` everything.
    The host is the one the request is for: a pinned request (app/upstream/url_guard.py) has the
    vetted address in its URL and the host's name in its Host header."""
    url = request.url
    host, port = url.host, url.port
    try:
        named = httpx.URL("http://" + request.headers.get("host", ""))
        if named.host:
            host, port = named.host, named.port
    except httpx.InvalidURL:
        pass
    host = host.lower().rstrip(".")
    port = port or (443 if url.scheme == "https" else 80)
    for entry in no_proxy.lower().split(","):
        entry = entry.strip()
        if entry == "*":
            return True
        pattern, entry_port = _split_port(entry)
        pattern = pattern.removeprefix("*").removeprefix(".").rstrip(".")
        if not pattern or (entry_port and entry_port != str(port)):
            continue
        if host == pattern or host.endswith("." + pattern):
            return True
    return False


def _split_port(entry: str) -> tuple[str, str]:
    if entry.startswith("["):  # [v6] or [v6]:port
        host, _, rest = entry[1:].partition("]")
        return host, rest.removeprefix(":")
    if entry.count(":") == 1:  # host:port
        host, _, port = entry.partition(":")
        return host, port
    return entry, ""  # a name, an IPv4 address, or an IPv6 address without brackets


def _variable(env: Mapping[str, str], lower: str) -> tuple[str, str]:
    # Set in lower case, even empty, it wins (as in urllib and curl).
    if lower in env:
        return lower, env[lower].strip()
    upper = lower.upper()
    return upper, env.get(upper, "").strip()
