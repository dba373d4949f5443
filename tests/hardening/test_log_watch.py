"""The traceback watch itself (tests/support/log_watch.py): it sees a traceback the gateway logs
from its server thread, and the client still gets an envelope without the trace."""

from __future__ import annotations

import httpx
import pytest
from openai import InternalServerError

from app.main import create_app
from tests.support import images
from tests.support.gateway_env import gateway_settings
from tests.support.log_watch import COLLECTOR
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread


class ExplodingTransport(httpx.AsyncBaseTransport):
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raise RuntimeError("a bug in the gateway, not in the request")


@pytest.mark.server_error_expected
def test_log_watch_collects_a_server_side_traceback() -> None:
    settings = gateway_settings("http://127.0.0.1:9/v1")
    start = len(COLLECTOR.records)
    with serve_in_thread(create_app(settings, transport=ExplodingTransport())) as url:
        client = sdk_client(url)
        with pytest.raises(InternalServerError) as caught:
            client.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == 500
    assert "Traceback" not in caught.value.response.text
    assert "a bug in the gateway" not in caught.value.response.text
    logged = COLLECTOR.describe(COLLECTOR.records[start:])
    assert "RuntimeError: a bug in the gateway" in logged
