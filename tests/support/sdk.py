"""The real OpenAI SDK pointed at a test gateway: no retries of its own (a test counts every call)
and a timeout well inside the test's, so a hung gateway fails the test with the SDK's error."""

from __future__ import annotations

from openai import OpenAI

from tests.support.constants import CLIENT_KEY


def sdk_client(
    gateway_url: str, *, key: str = CLIENT_KEY, max_retries: int = 0, timeout: float = 30
) -> OpenAI:
    """A client of the gateway at `gateway_url` (no /v1: the client adds it)."""
    return OpenAI(
        base_url=gateway_url + "/v1", api_key=key, max_retries=max_retries, timeout=timeout
    )
