"""Acceptance for the `bfl` upstream: the real OpenAI SDK edits through the gateway and a fake
Black Forest Labs API on a real port sees BFL's JSON, is polled, and serves the results."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.fakes.bfl_upstream import FakeBflUpstream, SubmitReply
from tests.support import images
from tests.support.bfl_gateway import BFL_KEYS, sdk, serve_bfl_gateway
from tests.support.servers import serve_in_thread


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def bfl_server() -> Iterator[FakeBflUpstream]:
    fake = FakeBflUpstream(keys=BFL_KEYS)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def decoy_server() -> Iterator[FakeBflUpstream]:
    fake = FakeBflUpstream()
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture
def bfl_gateway(bfl_server: FakeBflUpstream, tmp_path: Path) -> Iterator[str]:
    # One gateway per test: key health (cooldowns, disabled keys) must not leak between tests.
    with serve_bfl_gateway(tmp_path, bfl_url=bfl_server.url) as url:
        yield url


@pytest.fixture
def bfl(bfl_server: FakeBflUpstream) -> Iterator[FakeBflUpstream]:
    bfl_server.reset()
    yield bfl_server
    bfl_server.reset()


@pytest.fixture
def decoy(decoy_server: FakeBflUpstream) -> Iterator[FakeBflUpstream]:
    decoy_server.reset()
    yield decoy_server


@pytest.fixture
def flux(bfl_gateway: str, bfl: FakeBflUpstream) -> OpenAI:
    return sdk(bfl_gateway)


def decoded(result: openai.types.ImagesResponse) -> list[bytes]:
    return [base64.b64decode(item.b64_json or "") for item in result.data]


# Acceptance 1: one image, three images, aspect_ratio, size mapped.


def test_bfl_edit_single_image(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    source = images.png(64, 48)
    result = flux.images.edit(
        image=("photo.png", source, "image/png"), prompt="a red hat", model="flux-kontext-pro"
    )
    (task,) = bfl.submits
    assert task.endpoint == "flux-kontext-pro"
    assert task.key in BFL_KEYS
    assert task.image_sha("input_image") == sha(source)
    assert not task.body["input_image"].startswith("data:")  # bare base64, as BFL wants
    assert task.body == {
        "prompt": "a red hat",
        "input_image": task.body["input_image"],
        # Per-model defaults from the catalog; no aspect_ratio: BFL keeps the input's.
        "output_format": "png",
        "safety_tolerance": 2,
        "prompt_upsampling": False,
    }
    assert decoded(result) == [task.result]
    assert task.polls == 2  # Pending, then Ready
    poll = next(hit for hit in bfl.hits if hit.path == "/v1/get_result")
    assert poll.headers["x-key"] == task.key
    download = next(hit for hit in bfl.hits if hit.path.startswith("/results/"))
    assert "x-key" not in download.headers  # the key goes to BFL's API, not to result hosts
    assert result.output_format == "png"


def test_bfl_edit_three_images_in_order(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    sources = [images.png(64, 64), images.jpeg(80, 60), images.webp(40, 30)]
    result = flux.images.edit(
        image=[
            ("a.png", sources[0], "image/png"),
            ("b.jpg", sources[1], "image/jpeg"),
            ("c.webp", sources[2], "image/webp"),
        ],
        prompt="put the hat from image 2 on the cat in image 1",
        model="flux-kontext-max",
    )
    (task,) = bfl.submits
    assert task.endpoint == "flux-kontext-max"
    assert [task.image_sha(name) for name in ("input_image", "input_image_2", "input_image_3")] == [
        sha(source) for source in sources
    ]
    assert "input_image_4" not in task.body
    assert len(result.data) == 1


def test_bfl_edit_aspect_ratio_and_size_mapping(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    image = ("a.png", images.png(), "image/png")
    flux.images.edit(image=image, prompt="wide", extra_body={"aspect_ratio": "16:9"})
    flux.images.edit(image=image, prompt="tall", size="1024x1536")
    flux.images.edit(image=image, prompt="cinema", size="1792x1024")
    flux.images.edit(image=image, prompt="as is", size="auto")
    wide, tall, cinema, as_is = (task.body for task in bfl.submits)
    assert wide["aspect_ratio"] == "16:9" and "size" not in wide
    assert tall["aspect_ratio"] == "2:3" and "size" not in tall
    assert cinema["aspect_ratio"] == "16:9"
    assert "aspect_ratio" not in as_is and "size" not in as_is


def test_bfl_edit_flux_fields_from_the_request(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    flux.images.edit(
        image=("a.png", images.png(), "image/png"),
        prompt="x",
        output_format="jpeg",
        extra_body={"seed": "42", "safety_tolerance": "5", "prompt_upsampling": "true"},
    )
    (task,) = bfl.submits
    assert task.body["seed"] == 42
    assert task.body["safety_tolerance"] == 5
    assert task.body["prompt_upsampling"] is True
    assert task.body["output_format"] == "jpeg"
    # Fields outside BFL's schema never go out: a client must not set BFL's webhook_url.
    flux.images.edit(
        image=("a.png", images.png(), "image/png"),
        prompt="x",
        user="someone",
        extra_body={"webhook_url": "http://127.0.0.1:1/hook"},
    )
    assert set(bfl.submits[1].body) == {
        "prompt",
        "input_image",
        "output_format",
        "safety_tolerance",
        "prompt_upsampling",
    }


def test_bfl_generation_is_a_kontext_task_without_input_image(
    flux: OpenAI, bfl: FakeBflUpstream
) -> None:
    result = flux.images.generate(
        model="flux-kontext-pro", prompt="a lighthouse at dusk", extra_body={"aspect_ratio": "16:9"}
    )
    (task,) = bfl.submits
    assert task.body["prompt"] == "a lighthouse at dusk"
    assert task.body["aspect_ratio"] == "16:9"
    assert not any(name.startswith("input_image") for name in task.body)
    assert decoded(result) == [task.result]


# Acceptance 2: n tasks for n images.


def test_bfl_edit_n_3_runs_three_tasks(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    result = flux.images.edit(
        image=("a.png", images.png(), "image/png"), prompt="x", n=3, extra_body={"seed": "7"}
    )
    tasks = bfl.submits
    assert len(tasks) == 3 and len(result.data) == 3
    assert sorted(decoded(result)) == sorted(task.result for task in tasks)
    assert len(set(decoded(result))) == 3
    # One seed for n tasks would make n identical images: each task gets its own.
    assert sorted(task.body["seed"] for task in tasks) == [7, 8, 9]


def test_bfl_edit_n_tasks_run_at_most_max_parallel_at_once(
    bfl: FakeBflUpstream, tmp_path: Path
) -> None:
    # Each task stays pending for 10 polls, so two tasks admitted together overlap.
    bfl.default_statuses = ("Pending",) * 10 + ("Ready",)
    with serve_bfl_gateway(tmp_path, bfl_url=bfl.url, bfl={"max_parallel_tasks": 2}) as url:
        result = sdk(url).images.edit(image=("a.png", images.png(), "image/png"), prompt="x", n=5)
    assert len(result.data) == 5 and len(bfl.submits) == 5
    assert bfl.max_active == 2


# Rejected before any upstream call.


def test_bfl_edit_mask_rejected_before_upstream(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        flux.images.edit(
            image=("a.png", images.png(64, 64), "image/png"),
            mask=("m.png", images.mask_png(64, 64), "image/png"),
            prompt="x",
        )
    assert caught.value.body["param"] == "mask"  # type: ignore[index]
    assert bfl.hits == []


def test_bfl_edit_five_images_rejected_before_upstream(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        flux.images.edit(
            image=[(f"{i}.png", images.png(16, 16), "image/png") for i in range(5)], prompt="x"
        )
    assert caught.value.body["code"] == "too_many_images"  # type: ignore[index]
    assert bfl.hits == []


def test_bfl_edit_bad_flux_field_rejected_before_upstream(
    flux: OpenAI, bfl: FakeBflUpstream
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        flux.images.edit(
            image=("a.png", images.png(), "image/png"),
            prompt="x",
            extra_body={"safety_tolerance": "9"},
        )
    assert caught.value.body["param"] == "safety_tolerance"  # type: ignore[index]
    assert bfl.hits == []


def test_bfl_edit_url_response_format_answers_a_gateway_hosted_url(
    flux: OpenAI, bfl: FakeBflUpstream
) -> None:
    # BFL itself answers a URL valid ~10 minutes; the gateway downloads it at once, stores the
    # bytes and answers its own URL (issue 5), which serves the same image as b64_json would.
    source = images.png()
    hosted = flux.images.edit(
        image=("a.png", source, "image/png"), prompt="x", response_format="url"
    )
    url = str(hosted.data[0].url)
    assert "/v1/images/files/" in url
    served = httpx.get(url)
    assert served.status_code == 200 and served.headers["content-type"].startswith("image/")
    inline = flux.images.edit(
        image=("a.png", source, "image/png"), prompt="x", response_format="b64_json"
    )
    assert decoded(inline) == [served.content]
    assert len(bfl.submits) == 1  # the second answer came from the cache


# Acceptance 3: terminal statuses and the allowlist.


@pytest.mark.parametrize(
    ("status", "http_status", "code"),
    [
        ("Request Moderated", 400, "moderation_blocked"),
        ("Content Moderated", 400, "moderation_blocked"),
        ("Error", 502, "upstream_task_failed"),
        ("Task not found", 502, "upstream_task_not_found"),
    ],
)
def test_bfl_terminal_status_maps_to_openai_error(
    flux: OpenAI, bfl: FakeBflUpstream, status: str, http_status: int, code: str
) -> None:
    bfl.default_statuses = ("Pending", status)  # every task, should the gateway retry
    with pytest.raises(openai.APIStatusError) as caught:
        flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == http_status
    assert caught.value.body["code"] == code  # type: ignore[index]
    assert bfl.submits
    assert not any(hit.path.startswith("/results/") for hit in bfl.hits)


def test_bfl_poll_deadline_is_a_504_without_resubmitting(
    bfl_server: FakeBflUpstream, bfl: FakeBflUpstream, tmp_path: Path
) -> None:
    bfl.scripts.append(("Pending",))  # never finishes
    with (
        serve_bfl_gateway(tmp_path, bfl_url=bfl.url, bfl={"poll_deadline": 0.5}) as url,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        sdk(url, max_retries=2).images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == 504
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(bfl.submits) == 1  # the SDK's own retries were told not to pay twice
    assert bfl.submits[0].polls >= 1


def test_bfl_submit_read_timeout_is_never_resent(bfl: FakeBflUpstream, tmp_path: Path) -> None:
    bfl.submit_replies.append(SubmitReply(delay=3.0))
    with (
        serve_bfl_gateway(tmp_path, bfl_url=bfl.url, timeouts={"connect": 5, "total": 0.5}) as url,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        sdk(url, max_retries=2).images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == 504
    submits = [hit for hit in bfl.hits if hit.method == "POST"]
    assert len(submits) == 1


def test_bfl_transient_poll_failures_are_polled_through(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    bfl.poll_failures.extend([503, 429])
    result = flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert decoded(result) == [bfl.submits[0].result]
    assert len(bfl.submits) == 1


def test_bfl_polling_url_outside_allowlist_is_never_fetched(
    flux: OpenAI, bfl: FakeBflUpstream, decoy: FakeBflUpstream
) -> None:
    # `localhost` reaches the decoy, but only 127.0.0.1 is allowed: the name is what is checked.
    bfl.polling_base = decoy.url.replace("127.0.0.1", "localhost")
    with pytest.raises(openai.InternalServerError) as caught:
        flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_url_refused"  # type: ignore[index]
    assert decoy.hits == []
    assert {hit.path for hit in bfl.hits} == {"/v1/flux-kontext-pro"}  # submitted, never polled


def test_bfl_sample_url_outside_allowlist_is_never_fetched(
    flux: OpenAI, bfl: FakeBflUpstream, decoy: FakeBflUpstream
) -> None:
    bfl.sample_base = decoy.url.replace("127.0.0.1", "localhost")
    with pytest.raises(openai.InternalServerError) as caught:
        flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.body["code"] == "upstream_url_refused"  # type: ignore[index]
    assert decoy.hits == []
    assert not any(hit.path.startswith("/results/") for hit in bfl.hits)


def test_bfl_oversized_result_is_refused(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    bfl.result_override = images.noise_png(200, 200)  # ~120 KB, over the test cap of 64 KiB
    with pytest.raises(openai.InternalServerError) as caught:
        flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == 502
    assert "larger than" in caught.value.body["message"]  # type: ignore[index]


# Account-level answers on submit.


def test_bfl_submit_402_is_an_out_of_credits_502(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    for _ in BFL_KEYS:  # every key is out of credits
        bfl.submit_replies.append(SubmitReply(402, {"detail": "Insufficient credits"}))
    with pytest.raises(openai.InternalServerError) as caught:
        flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_quota_exhausted"  # type: ignore[index]


def test_bfl_submit_429_is_a_429_with_retry_after(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    for _ in BFL_KEYS:  # every key is over BFL's concurrency limit
        bfl.submit_replies.append(
            SubmitReply(429, {"detail": "Too many active tasks"}, headers={"retry-after": "7"})
        )
    with pytest.raises(openai.RateLimitError) as caught:
        flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    assert 1 <= int(caught.value.response.headers["retry-after"]) <= 7


def test_bfl_submit_402_disables_the_key(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    bfl.submit_replies.append(SubmitReply(402, {"detail": "Insufficient credits"}))
    image = ("a.png", images.png(), "image/png")
    flux.images.edit(image=image, prompt="x")  # the pool fails over to the other key
    broke, paid = (hit.headers["x-key"] for hit in bfl.hits if hit.method == "POST")
    assert broke != paid
    flux.images.edit(image=image, prompt="y")
    flux.images.edit(image=image, prompt="z")
    # The key without credits stays out of rotation (until a probe finds credits again).
    later = [hit.headers["x-key"] for hit in bfl.hits if hit.method == "POST"][2:]
    assert later == [paid, paid]


def test_bfl_key_disabled_for_402_comes_back_once_credits_do(
    bfl: FakeBflUpstream, tmp_path: Path
) -> None:
    image = ("a.png", images.png(), "image/png")
    bfl.credits = dict.fromkeys(BFL_KEYS, 0.0)
    bfl.submit_replies.append(SubmitReply(402, {"detail": "Insufficient credits"}))

    def probes_of(key: str) -> int:
        return sum(
            1 for hit in bfl.hits if hit.path == "/v1/credits" and hit.headers["x-key"] == key
        )

    def submits() -> list[str]:
        return [hit.headers["x-key"] for hit in bfl.hits if hit.method == "POST"]

    def wait_for(condition: Callable[[], bool]) -> None:
        for _ in range(200):  # 10 s at most
            if condition():
                return
            time.sleep(0.05)
        raise AssertionError("the key pool never probed the disabled key")

    with serve_bfl_gateway(
        tmp_path, bfl_url=bfl.url, extra={"pool": {"probe_interval": 0.2}}
    ) as url:
        client = sdk(url)
        client.images.edit(image=image, prompt="first")
        broke, other = submits()
        # The free probe (GET /v1/credits) finds no credits: the key stays out of rotation.
        wait_for(lambda: probes_of(broke) >= 1)
        client.images.edit(image=image, prompt="second")
        assert submits()[2:] == [other]
        # Credits are topped up: the next probe brings the key back, and it serves again.
        bfl.credits[broke] = 50.0
        for attempt in range(20):
            client.images.edit(image=image, prompt=f"after top-up {attempt}")
            if submits()[-1] == broke:
                break
            time.sleep(0.1)
        assert submits()[-1] == broke
    assert not any(hit.path == "/v1/credits" and hit.headers["x-key"] == other for hit in bfl.hits)


def test_bfl_submit_429_cools_the_key_down(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    bfl.submit_replies.append(
        SubmitReply(429, {"detail": "Too many active tasks"}, headers={"retry-after": "60"})
    )
    image = ("a.png", images.png(), "image/png")
    flux.images.edit(image=image, prompt="x")  # served by the other key
    cooled, other = (hit.headers["x-key"] for hit in bfl.hits if hit.method == "POST")
    assert cooled != other
    flux.images.edit(image=image, prompt="y")
    assert [hit.headers["x-key"] for hit in bfl.hits if hit.method == "POST"][2:] == [other]


def test_bfl_submit_rejection_never_echoes_the_key(flux: OpenAI, bfl: FakeBflUpstream) -> None:
    bfl.submit_replies.append(
        SubmitReply(422, {"detail": [{"msg": f"bad request for key {BFL_KEYS[0]}"}]})
    )
    with pytest.raises(openai.BadRequestError) as caught:
        flux.images.edit(image=("a.png", images.png(), "image/png"), prompt="x")
    message = caught.value.body["message"]  # type: ignore[index]
    assert "bad request for key" in message
    assert BFL_KEYS[0] not in message and "[redacted]" in message
