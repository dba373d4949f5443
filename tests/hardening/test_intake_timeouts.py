"""The intake's body deadlines (limits.body_idle_timeout and limits.body_timeout), driven by
async generators standing in for the ASGI body stream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from app.config.settings import Limits
from app.errors import RequestTimeout
from app.intake.form import IntakeForm, read_form
from tests.hardening import multipart as mp
from tests.support import images

BODY = mp.encode([mp.file("image", images.png(64, 64)), mp.text("prompt", "x")])


async def drip(body: bytes, *, step: int, pause: float) -> AsyncIterator[bytes]:
    for start in range(0, len(body), step):
        yield body[start : start + step]
        await asyncio.sleep(pause)


async def stall_after(body: bytes, sent: int) -> AsyncIterator[bytes]:
    yield body[:sent]
    await asyncio.sleep(3600)
    yield body[sent:]


def read(chunks: AsyncIterator[bytes], **limits: float) -> IntakeForm:
    async def run() -> IntakeForm:
        return await read_form(
            chunks,
            content_type=mp.content_type(),
            content_length=None,
            limits=Limits.model_validate(limits),
            max_file_bytes=10**7,
        )

    return asyncio.run(asyncio.wait_for(run(), timeout=30))


def test_intake_timeouts_a_stalled_body_raises_408_with_connection_close() -> None:
    with pytest.raises(RequestTimeout) as caught:
        read(stall_after(BODY, 100), body_idle_timeout=0.2, body_timeout=60)
    assert caught.value.status_code == 408
    assert caught.value.headers["connection"] == "close"


def test_intake_timeouts_a_drip_under_the_idle_timeout_still_meets_the_total_deadline() -> None:
    # One byte every 50 ms never trips a 1 s idle timeout; the 0.5 s total deadline stops it.
    with pytest.raises(RequestTimeout) as caught:
        read(drip(BODY, step=1, pause=0.05), body_idle_timeout=1, body_timeout=0.5)
    assert "0.5 seconds in all" in caught.value.message


def test_intake_timeouts_a_steady_body_is_read_whole() -> None:
    form = read(drip(BODY, step=4096, pause=0), body_idle_timeout=5, body_timeout=60)
    assert [f.name for f in form.fields] == ["prompt"]
    assert [f.field for f in form.files] == ["image"]
    form.close()
