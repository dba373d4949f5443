"""Which proxy a request goes through: the environment's variables as curl and httpx read them,
NO_PROXY matched against the name a request is for, proxies named in config."""

from __future__ import annotations

import httpx
import pytest

from app.upstream.egress import Egress, Proxy, ProxyUrlError


def request(url: str, host: str | None = None) -> httpx.Request:
    headers = {"host": host} if host else {}
    return httpx.Request("POST", url, headers=headers)


def test_https_and_http_proxies_come_from_their_own_variables() -> None:
    egress = Egress.from_environment(
        {"HTTPS_PROXY": "http://secure.proxy:3128", "HTTP_PROXY": "plain.proxy:8080"}
    )
    secure = egress.proxy_for(request("https://api.openai.com/v1/images/edits"))
    plain = egress.proxy_for(request("http://reseller.internal/v1/images/edits"))
    assert secure == Proxy("http://secure.proxy:3128")
    assert plain == Proxy("http://plain.proxy:8080")  # a bare host:port is an http proxy


def test_lower_case_wins_even_when_empty_and_all_proxy_covers_both() -> None:
    unset = Egress.from_environment({"https_proxy": "", "HTTPS_PROXY": "http://upper:1"})
    assert unset.proxy_for(request("https://api.openai.com/")) is None
    everything = Egress.from_environment({"ALL_PROXY": "http://all:2", "http_proxy": "h:3"})
    assert everything.proxy_for(request("https://api.openai.com/")) == Proxy("http://all:2")
    assert everything.proxy_for(request("http://example.com/")) == Proxy("http://h:3")
    assert Egress.from_environment({}).proxy_for(request("https://api.openai.com/")) is None


@pytest.mark.parametrize(
    ("no_proxy", "url", "host", "bypassed"),
    [
        ("openai.com", "https://api.openai.com/", None, True),
        (".openai.com", "https://api.openai.com/", None, True),
        ("*.openai.com", "https://openai.com/", None, True),
        ("openai.com", "https://badopenai.com/", None, False),
        ("*", "https://anything.example/", None, True),
        ("10.0.0.5", "http://10.0.0.5:8080/", None, True),
        ("reseller.internal:8443", "https://reseller.internal:8443/", None, True),
        ("reseller.internal:8443", "https://reseller.internal/", None, False),
        ("[::1]", "http://[::1]:9000/", None, True),
        # A pinned request (app/upstream/url_guard.py) is matched by the name it is for.
        ("images.example.com", "https://93.184.216.34/a.png", "images.example.com", True),
        ("93.184.216.34", "https://93.184.216.34/a.png", "images.example.com", False),
    ],
)
def test_no_proxy_matches_hosts_and_their_subdomains(
    no_proxy: str, url: str, host: str | None, bypassed: bool
) -> None:
    proxy = "http://proxy:3128"
    egress = Egress.from_environment(
        {"HTTPS_PROXY": proxy, "HTTP_PROXY": proxy, "NO_PROXY": no_proxy}
    )
    assert (egress.proxy_for(request(url, host)) is None) is bypassed


def test_credentials_become_a_header_and_never_part_of_the_url() -> None:
    proxy = Proxy.parse("http://user:p%40ss@proxy.internal:3128")
    assert proxy.url == "http://proxy.internal:3128"
    assert proxy.authorization() == "Basic dXNlcjpwQHNz"  # user:p@ss
    assert "p@ss" in proxy.secrets()
    assert "p@ss" not in repr(proxy)
    apart = Proxy.parse("http://proxy.internal:3128", "user:secret")
    assert apart.authorization() == "Basic dXNlcjpzZWNyZXQ="


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("https://proxy:443", "only http:// proxies"),
        ("socks5://user:hunter2@proxy:1080", "only http:// proxies"),
        ("http://proxy:3128/path", "without a path"),
        ("http://", "names no host"),
        ("http://proxy:99999", "not a valid URL"),
    ],
)
def test_unusable_proxy_urls_are_refused_without_repeating_credentials(
    raw: str, problem: str
) -> None:
    with pytest.raises(ProxyUrlError, match=problem) as caught:
        Egress.from_environment({"HTTPS_PROXY": raw})
    assert str(caught.value).startswith("HTTPS_PROXY: ")
    assert "hunter2" not in str(caught.value)
