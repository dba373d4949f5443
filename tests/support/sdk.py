"""The real OpenAI SDK pointed at a test gateway: no retries of its own (a test counts every call)
and a timeout well inside the test's, so a hung gateway fails the test with the SDK's error."""

from __future__ import annotations

import functools
import ssl

import httpx2
from openai import DefaultHttpxClient, OpenAI

from tests.support.constants import CLIENT_KEY


@functools.cache
def tls_context() -> ssl.SSLContext:
    """The SDK's default verifying TLS context, built once per test process: each client building
    its own loads the CA bundle (~25 ms of CPU), and the suite makes well over a thousand."""
    return httpx2.create_ssl_context()


class _HttpClient(DefaultHttpxClient):
    """The SDK's default HTTP client, closed when dropped as the SDK closes the one it builds
    itself (tests rarely close their clients)."""

    def __del__(self) -> None:
        if not self.is_closed:
            self.close()


def sdk_client(
    gateway_url: str, *, key: str = CLIENT_KEY, max_retries: int = 0, timeout: float = 30
) -> OpenAI:
    """A client of the gateway at `gateway_url` (no /v1: the client adds it)."""
    return OpenAI(
        base_url=gateway_url + "/v1",
        api_key=key,
        max_retries=max_retries,
        timeout=timeout,
        # The SDK's own default HTTP client (its limits, redirects), on the shared TLS context.
        http_client=_HttpClient(verify=tls_context(), timeout=timeout),
    )
