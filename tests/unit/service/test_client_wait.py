"""Unit: a request waits for its answer only while its client does."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import ClientDisconnect
from starlette.types import Message

from app.service.client_wait import client_read_timeout, while_client_waits


class Connection:
    """An ASGI receive(): the rest of the body, then nothing until the client disconnects."""

    def __init__(self) -> None:
        self.gone = asyncio.Event()
        self.sent_tail = False

    async def receive(self) -> Message:
        if not self.sent_tail:
            self.sent_tail = True
            return {"type": "http.request", "body": b"epilogue", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}


class Work:
    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.cancelled = False

    async def __call__(self) -> str:
        try:
            await self.done.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        return "answer"


def test_client_wait_returns_the_answer_while_the_client_is_there() -> None:
    async def scenario() -> None:
        connection, work = Connection(), Work()
        asyncio.get_running_loop().call_later(0.05, work.done.set)
        assert await while_client_waits(connection.receive, work()) == "answer"

    asyncio.run(scenario())


def test_client_wait_stops_and_cancels_the_work_when_the_client_disconnects() -> None:
    async def scenario() -> None:
        connection, work = Connection(), Work()
        asyncio.get_running_loop().call_later(0.05, connection.gone.set)
        with pytest.raises(ClientDisconnect):
            await while_client_waits(connection.receive, work())
        assert work.cancelled

    asyncio.run(scenario())


def test_client_wait_cancelled_by_a_deadline_cancels_the_work() -> None:
    async def scenario() -> None:
        connection, work = Connection(), Work()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await while_client_waits(connection.receive, work())
        assert work.cancelled

    asyncio.run(scenario())


def test_client_read_timeout_reads_the_sdk_header_and_ignores_nonsense() -> None:
    assert client_read_timeout({"x-stainless-read-timeout": "600.0"}) == 600.0
    assert client_read_timeout({"x-stainless-read-timeout": "1"}) == 1.0
    assert client_read_timeout({}) is None
    for nonsense in ("", "soon", "0", "-5", "nan", "inf"):
        assert client_read_timeout({"x-stainless-read-timeout": nonsense}) is None
    assert client_read_timeout({"x-stainless-read-timeout": "1e12"}) == 24 * 3600.0
