"""Download an image URL the gateway did not choose: one an upstream answered with, or one a
client sent in a JSON edit.

Every URL, and every redirect, goes through the SSRF guard (allowed scheme, host and port,
resolved once to public addresses, connection pinned to the vetted address); size and time are
capped while the body streams.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpx

from app.config.settings import FetchConfig
from app.errors import UpstreamFailed
from app.upstream.url_guard import RefusedUrl, UrlGuard


class FetchRefused(UpstreamFailed):
    default_code = "upstream_url_refused"


def _refused(message: str) -> FetchRefused:
    return FetchRefused(message, failure="bad_response")


class ImageFetcher:
    def __init__(
        self,
        client: httpx.AsyncClient,
        config: FetchConfig,
        *,
        extra_hosts: Iterable[str] = (),
        extra_ports: Iterable[int] = (),
        guard: UrlGuard | None = None,
        subject: str = "The upstream's image",
    ) -> None:
        self._client = client
        # How messages name what is fetched: the same download serves client-sent image URLs.
        self._subject = subject
        self._lower_subject = subject[:1].lower() + subject[1:]
        self._config = config
        self._guard = guard or UrlGuard.from_config(
            config, extra_hosts=extra_hosts, extra_ports=extra_ports
        )

    async def __call__(self, url: str) -> bytes:
        try:
            async with asyncio.timeout(self._config.timeout):
                return await self._fetch(url)
        except RefusedUrl as exc:
            raise _refused(f"{self._subject} URL was refused: {exc}.") from None
        except TimeoutError:
            raise _refused(
                f"Downloading {self._lower_subject} took longer than {self._config.timeout:g} s."
            ) from None
        except httpx.HTTPError as exc:
            raise _refused(
                f"Downloading {self._lower_subject} failed ({type(exc).__name__})."
            ) from None

    async def _fetch(self, url: str) -> bytes:
        for _ in range(self._config.max_redirects + 1):
            pinned = await self._guard.check(url)
            response = await self._guard.send(self._client, pinned, headers={"accept": "image/*"})
            try:
                if response.is_redirect and "location" in response.headers:
                    url = self._guard.redirect(url, response.headers["location"])
                    continue
                if response.status_code != 200:
                    raise _refused(f"{self._subject} URL answered HTTP {response.status_code}.")
                return await self._read_capped(response)
            finally:
                await response.aclose()
        raise _refused(f"{self._subject} URL redirected too many times.")

    async def _read_capped(self, response: httpx.Response) -> bytes:
        limit = int(self._config.max_bytes)
        declared = response.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _refused(f"{self._subject} is larger than {limit} bytes.")
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise _refused(f"{self._subject} is larger than {limit} bytes.")
        return bytes(body)
