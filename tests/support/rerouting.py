"""An httpx transport standing in for the internet in SSRF tests: what the gateway sends to the
pretend-public address 93.184.216.34 goes to a loopback server instead, and every address a
connection was asked for is recorded."""

from __future__ import annotations

import httpx

PUBLIC_ADDRESS = "93.184.216.34"


class Rerouting(httpx.AsyncBaseTransport):
    def __init__(self, public_server: str) -> None:
        self.addresses: list[str] = []
        self._public = httpx.URL(public_server)
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.addresses.append(request.url.host)
        if request.url.host == PUBLIC_ADDRESS:
            request.url = request.url.copy_with(
                scheme="http", host=self._public.host, port=self._public.port
            )
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()
