"""The bfl dialect on its own, against the fake BFL API on a real port: the failure kinds and
headers the key pool acts on, for every way a task can go wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from app.config import UpstreamConfig
from app.edit import EditRequest, ImageInput
from app.errors import GatewayError
from app.intake.sniff import HEAD_BYTES, TAIL_BYTES, sniff_image
from app.intake.spool import SpooledUpload
from app.redaction import Redactor
from app.upstream.base import UpstreamAnswer, UpstreamKey
from app.upstream.bfl import BflUpstream
from tests.fakes.bfl_upstream import FakeBflUpstream, SubmitReply
from tests.support import images
from tests.support.bfl_gateway import BFL_KEYS, bfl_settings, write_bfl_config
from tests.support.servers import free_port, serve_in_thread

KEY = UpstreamKey(id="bfl#1", secret=SecretStr(BFL_KEYS[0]))


@pytest.fixture(scope="module")
def fake_bfl() -> Iterator[FakeBflUpstream]:
    fake = FakeBflUpstream(keys=BFL_KEYS)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture
def bfl(fake_bfl: FakeBflUpstream) -> Iterator[FakeBflUpstream]:
    fake_bfl.reset()
    yield fake_bfl
    fake_bfl.reset()


def upstream_config(tmp_path: Path, base_url: str) -> tuple[UpstreamConfig, EditRequest]:
    settings = bfl_settings(write_bfl_config(tmp_path, bfl_url=base_url))
    config = settings.upstreams["bfl"]
    upload = SpooledUpload("image", None, threshold=1 << 20, spool_dir=None)
    upload.write(images.png(32, 32))
    info = sniff_image(upload.head(HEAD_BYTES), upload.tail(TAIL_BYTES), upload.size)
    edit = EditRequest(
        model=settings.catalog.models["flux-kontext-pro"],
        prompt="x",
        images=(ImageInput(upload=upload, info=info, param="image"),),
        mask=None,
        params={},
        extra_fields=(),
        response_format=None,
        n=1,
    )
    return config, edit


def run_edit(config: UpstreamConfig, edit: EditRequest, key: UpstreamKey = KEY) -> UpstreamAnswer:
    async def go() -> UpstreamAnswer:
        async with httpx.AsyncClient() as client:
            upstream = BflUpstream("bfl", config, client, Redactor(BFL_KEYS))
            return await upstream.edit(edit, key)

    return asyncio.run(go())


def failure_of(config: UpstreamConfig, edit: EditRequest, key: UpstreamKey = KEY) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        run_edit(config, edit, key)
    return caught.value


def test_bfl_upstream_answers_an_images_response(tmp_path: Path, bfl: FakeBflUpstream) -> None:
    config, edit = upstream_config(tmp_path, bfl.url)
    answer = run_edit(config, edit)
    assert len(answer.body["data"]) == 1 and answer.body["output_format"] == "png"


def test_bfl_upstream_402_is_quota(tmp_path: Path, bfl: FakeBflUpstream) -> None:
    bfl.submit_replies.append(SubmitReply(402, {"detail": "Insufficient credits"}))
    error = failure_of(*upstream_config(tmp_path, bfl.url))
    assert (error.status_code, error.failure) == (502, "quota")


def test_bfl_upstream_429_is_rate_limited_with_headers(
    tmp_path: Path, bfl: FakeBflUpstream
) -> None:
    bfl.submit_replies.append(
        SubmitReply(429, {"detail": "busy"}, headers={"retry-after": "3", "x-other": "1"})
    )
    error = failure_of(*upstream_config(tmp_path, bfl.url))
    assert (error.status_code, error.failure) == (429, "rate_limited")
    assert error.upstream_headers == {"retry-after": "3"}
    assert error.headers == {"retry-after": "3"}


def test_bfl_upstream_bad_key_is_auth(tmp_path: Path, bfl: FakeBflUpstream) -> None:
    config, edit = upstream_config(tmp_path, bfl.url)
    error = failure_of(config, edit, UpstreamKey(id="bfl#9", secret=SecretStr("wrong-key")))
    assert (error.status_code, error.failure) == (502, "auth")
    assert "wrong-key" not in error.message


def test_bfl_upstream_closed_port_is_connect(tmp_path: Path) -> None:
    config, edit = upstream_config(tmp_path, f"http://127.0.0.1:{free_port()}")
    error = failure_of(config, edit)
    assert (error.status_code, error.failure) == (502, "connect")


def test_bfl_upstream_submit_read_timeout_is_timeout_sent_once(
    tmp_path: Path, bfl: FakeBflUpstream
) -> None:
    bfl.submit_replies.append(SubmitReply(delay=2.0))
    config, edit = upstream_config(tmp_path, bfl.url)
    config = config.model_copy(
        update={"timeouts": config.timeouts.model_copy(update={"total": 0.3})}
    )
    error = failure_of(config, edit)
    assert (error.status_code, error.failure) == (504, "timeout")
    assert error.headers["x-should-retry"] == "false"
    assert len([hit for hit in bfl.hits if hit.method == "POST"]) == 1


@pytest.mark.parametrize(
    ("statuses", "status_code", "failure"),
    [
        (("Request Moderated",), 400, "rejected"),
        (("Pending", "Content Moderated"), 400, "rejected"),
        (("Error",), 502, "server"),
        (("Task not found",), 502, "server"),
    ],
)
def test_bfl_upstream_terminal_statuses(
    tmp_path: Path,
    bfl: FakeBflUpstream,
    statuses: tuple[str, ...],
    status_code: int,
    failure: str,
) -> None:
    bfl.scripts.append(statuses)
    error = failure_of(*upstream_config(tmp_path, bfl.url))
    assert (error.status_code, error.failure) == (status_code, failure)


def test_bfl_upstream_poll_deadline_is_timeout(tmp_path: Path, bfl: FakeBflUpstream) -> None:
    bfl.scripts.append(("Pending",))
    config, edit = upstream_config(tmp_path, bfl.url)
    config = config.model_copy(update={"bfl": config.bfl.model_copy(update={"poll_deadline": 0.3})})
    error = failure_of(config, edit)
    assert (error.status_code, error.failure) == (504, "timeout")


def test_bfl_upstream_result_retried_after_a_5xx(tmp_path: Path, bfl: FakeBflUpstream) -> None:
    bfl.result_failures.append(503)
    answer = run_edit(*upstream_config(tmp_path, bfl.url))
    assert len(answer.body["data"]) == 1
    assert len([hit for hit in bfl.hits if hit.path.startswith("/results/")]) == 2


def test_bfl_upstream_https_required_unless_allowed(tmp_path: Path, bfl: FakeBflUpstream) -> None:
    config, edit = upstream_config(tmp_path, bfl.url)
    config = config.model_copy(update={"bfl": config.bfl.model_copy(update={"allow_http": False})})
    error = failure_of(config, edit)
    assert (error.status_code, error.failure, error.code) == (
        502,
        "bad_response",
        "upstream_url_refused",
    )
    assert [hit.method for hit in bfl.hits] == ["POST"]  # the http polling URL was not fetched


def test_bfl_upstream_probe_checks_key_and_credits(tmp_path: Path, bfl: FakeBflUpstream) -> None:
    config, _ = upstream_config(tmp_path, bfl.url)
    bfl.credits[BFL_KEYS[1]] = 0.0

    async def probe(secret: str) -> bool:
        async with httpx.AsyncClient() as client:
            upstream = BflUpstream("bfl", config, client, Redactor(BFL_KEYS))
            return await upstream.probe(UpstreamKey(id="bfl#1", secret=SecretStr(secret)))

    assert asyncio.run(probe(BFL_KEYS[0])) is True
    assert asyncio.run(probe(BFL_KEYS[1])) is False  # valid key, no credits left
    assert asyncio.run(probe("wrong-key")) is False
    assert all(hit.path == "/v1/credits" for hit in bfl.hits)  # free: nothing was submitted
