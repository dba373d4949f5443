"""Acceptance for spend safety across upstreams (issue 16): a BFL task, once accepted, is paid
for and never submitted again, on any key, whatever happens next; and a model's upstreams list
is an ordered fallback, so `upstreams: [bfl, default]` sends everything to BFL while it serves.
The real OpenAI SDK against the gateway; fake BFL and OpenAI-compatible upstreams on real ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.fakes.bfl_upstream import FakeBflUpstream, SubmitReply
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.support import images
from tests.support.bfl_gateway import BFL_KEYS, sdk, serve_bfl_gateway
from tests.support.servers import free_port, serve_in_thread


@pytest.fixture
def bfl() -> Iterator[FakeBflUpstream]:
    fake = FakeBflUpstream(keys=BFL_KEYS)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake
        fake.reset()


@pytest.fixture
def reseller() -> Iterator[FakeOpenAIUpstream]:
    fake = FakeOpenAIUpstream()
    with serve_in_thread(fake.app) as url:
        fake.url = url + "/v1"
        yield fake


def submits(bfl: FakeBflUpstream) -> list[str]:
    """The x-key of every submit POST the fake received, accepted or not."""
    return [hit.headers["x-key"] for hit in bfl.hits if hit.method == "POST"]


@pytest.mark.parametrize(
    ("status", "code"),
    [("Error", "upstream_task_failed"), ("Task not found", "upstream_task_not_found")],
)
def test_bfl_task_failing_after_acceptance_is_submitted_once(
    bfl: FakeBflUpstream, tmp_path: Path, status: str, code: str
) -> None:
    assert len(BFL_KEYS) == 2  # another key was there to resubmit on
    bfl.default_statuses = ("Pending", status)  # every task, should the gateway resubmit
    with (
        serve_bfl_gateway(tmp_path, bfl_url=bfl.url) as url,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        # The SDK's own retries are on: the gateway must tell it not to pay again either.
        sdk(url, max_retries=2).images.edit(
            image=("a.png", images.png(), "image/png"), prompt="x", model="flux-2-pro"
        )
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == code  # type: ignore[index]
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(submits(bfl)) == 1 and len(bfl.submits) == 1


def test_bfl_refused_polling_url_is_submitted_once(bfl: FakeBflUpstream, tmp_path: Path) -> None:
    # `localhost` is not in allowed_hosts (127.0.0.1 is): the guard refuses every polling URL.
    bfl.polling_base = bfl.url.replace("127.0.0.1", "localhost")
    with (
        serve_bfl_gateway(tmp_path, bfl_url=bfl.url) as url,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        sdk(url, max_retries=2).images.edit(
            image=("a.png", images.png(), "image/png"), prompt="x", model="flux-kontext-pro"
        )
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_url_refused"  # type: ignore[index]
    assert len(submits(bfl)) == 1
    assert not any(hit.path == "/v1/get_result" for hit in bfl.hits)  # never polled


def test_bfl_refused_result_url_is_submitted_once(bfl: FakeBflUpstream, tmp_path: Path) -> None:
    bfl.sample_base = bfl.url.replace("127.0.0.1", "localhost")
    with (
        serve_bfl_gateway(tmp_path, bfl_url=bfl.url) as url,
        pytest.raises(openai.InternalServerError),
    ):
        sdk(url).images.edit(
            image=("a.png", images.png(), "image/png"), prompt="x", model="flux-2-flex"
        )
    assert len(submits(bfl)) == 1


def test_bfl_one_of_n_tasks_refused_after_another_was_accepted_is_not_resubmitted(
    bfl: FakeBflUpstream, tmp_path: Path
) -> None:
    # n=2: one task is accepted (and billed), the other's submit is rate limited. Failing over
    # to the other key would submit both again, paying for the accepted one twice.
    # One task at a time: the first is accepted and finishes before the second is submitted.
    bfl.submit_replies.extend([SubmitReply(), SubmitReply(429, {"detail": "too many"})])
    with (
        serve_bfl_gateway(tmp_path, bfl_url=bfl.url, bfl={"max_parallel_tasks": 1}) as url,
        pytest.raises(openai.APIStatusError),
    ):
        sdk(url).images.edit(
            image=("a.png", images.png(), "image/png"), prompt="x", model="flux-2-pro", n=2
        )
    assert len(submits(bfl)) == 2 and len(bfl.submits) == 1


def test_bfl_rejected_submit_still_fails_over_to_the_other_key(
    bfl: FakeBflUpstream, tmp_path: Path
) -> None:
    # Not accepted, so not paid for: another key may try (the rule is about acceptance only).
    bfl.submit_replies.append(SubmitReply(402, {"detail": "Insufficient credits"}))
    with serve_bfl_gateway(tmp_path, bfl_url=bfl.url) as url:
        result = sdk(url).images.edit(
            image=("a.png", images.png(), "image/png"), prompt="x", model="flux-2-pro"
        )
    assert len(result.data) == 1
    assert sorted(submits(bfl)) == sorted(BFL_KEYS)


def test_bfl_listed_first_serves_every_edit_while_healthy(
    bfl: FakeBflUpstream, reseller: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    # Equal priorities (none set): the list order alone says BFL first, the reseller after.
    with serve_bfl_gateway(
        tmp_path, bfl_url=bfl.url, openai_url=reseller.url, flux_upstreams=("bfl", "default")
    ) as url:
        client = sdk(url)
        for index in range(20):
            client.images.edit(
                image=("a.png", images.png(), "image/png"),
                prompt=f"edit {index}",  # distinct, so none is answered from the cache
                model="flux-kontext-pro",
            )
    assert len(bfl.submits) == 20
    assert reseller.edits == []


def test_bfl_down_sends_every_edit_to_the_next_upstream(
    reseller: FakeOpenAIUpstream, tmp_path: Path
) -> None:
    with serve_bfl_gateway(
        tmp_path,
        bfl_url=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        openai_url=reseller.url,
        flux_upstreams=("bfl", "default"),
    ) as url:
        client = sdk(url)
        for index in range(5):
            result = client.images.edit(
                image=("a.png", images.png(), "image/png"),
                prompt=f"edit {index}",
                model="flux-kontext-pro",
            )
            assert len(result.data) == 1
    assert len(reseller.edits) == 5
