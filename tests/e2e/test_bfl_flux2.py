"""Acceptance for FLUX.2 on a `bfl` upstream (issue 16): the real OpenAI SDK edits through the
gateway and a fake Black Forest Labs API on a real port receives up to 8 reference images as
`input_image`..`input_image_8`, width/height from `size` or `aspect_ratio`, and flex's
steps/guidance; every rule the catalog sets is a 400 naming the param before anything is sent."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai import OpenAI

from tests.fakes.bfl_upstream import BflTask, FakeBflUpstream
from tests.support import images
from tests.support.bfl_gateway import BFL_KEYS, sdk, serve_bfl_gateway
from tests.support.servers import serve_in_thread

FileTuple = tuple[str, bytes, str]


@pytest.fixture(scope="module")
def bfl_server() -> Iterator[FakeBflUpstream]:
    fake = FakeBflUpstream(keys=BFL_KEYS)
    with serve_in_thread(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture(scope="module")
def gateway(bfl_server: FakeBflUpstream, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve_bfl_gateway(tmp_path_factory.mktemp("flux2"), bfl_url=bfl_server.url) as url:
        yield url


@pytest.fixture
def bfl(bfl_server: FakeBflUpstream) -> Iterator[FakeBflUpstream]:
    bfl_server.reset()
    yield bfl_server
    bfl_server.reset()


@pytest.fixture
def client(gateway: str, bfl: FakeBflUpstream) -> OpenAI:
    return sdk(gateway)


def distinct_images(count: int) -> list[FileTuple]:
    """`count` different images in the three formats, so a swapped or dropped one shows."""
    makers = (
        lambda i: ("png", images.png(32 + i, 32, colour=(i * 20, 10, 10)), "image/png"),
        lambda i: ("jpg", images.jpeg(40 + i, 30), "image/jpeg"),
        lambda i: ("webp", images.webp(24 + i, 20), "image/webp"),
    )
    made = [makers[i % 3](i) for i in range(count)]
    return [(f"ref{i}.{ext}", data, mime) for i, (ext, data, mime) in enumerate(made)]


def only_task(bfl: FakeBflUpstream) -> BflTask:
    (task,) = bfl.submits
    return task


def refused(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    body = caught.value.body
    assert isinstance(body, dict)
    return body


def test_flux2_pro_edit_with_8_reference_images_reaches_bfl_byte_for_byte(
    client: OpenAI, bfl: FakeBflUpstream
) -> None:
    sent = distinct_images(8)
    result = client.images.edit(
        image=sent, prompt="combine all eight", model="flux-2-pro", size="1536x1024"
    )
    task = only_task(bfl)
    assert task.endpoint == "flux-2-pro"
    fields = ["input_image"] + [f"input_image_{n}" for n in range(2, 9)]
    assert [task.image(name) for name in fields] == [data for _, data, _ in sent]
    assert not any(name.startswith("input_image_9") for name in task.body)
    # size=1536x1024 arrives as width/height within FLUX.2's rules (multiples of 16, <= 4 MP).
    assert (task.body["width"], task.body["height"]) == (1536, 1024)
    assert task.body["width"] % 16 == 0 and task.body["width"] * task.body["height"] <= 4 << 20
    assert "size" not in task.body and "aspect_ratio" not in task.body
    assert task.body["output_format"] == "png" and task.body["safety_tolerance"] == 2
    # Kontext's prompt_upsampling is not among flux-2-pro's fields; nor is a webhook.
    assert set(task.body) == {
        "prompt",
        *fields,
        "width",
        "height",
        "output_format",
        "safety_tolerance",
    }
    assert base64.b64decode(result.data[0].b64_json or "") == task.result


def test_flux2_aspect_ratio_becomes_width_and_height(client: OpenAI, bfl: FakeBflUpstream) -> None:
    image = distinct_images(1)
    client.images.edit(
        image=image, prompt="wide", model="flux-2-max", extra_body={"aspect_ratio": "16:9"}
    )
    client.images.edit(image=image, prompt="as is", model="flux-2-max", size="auto")
    wide, as_is = (task.body for task in bfl.submits)
    assert (wide["width"], wide["height"]) == (1360, 768) and "aspect_ratio" not in wide
    assert "width" not in as_is and "height" not in as_is  # BFL keeps the input's size


def test_flux2_ninth_image_is_a_400_and_bfl_receives_nothing(
    client: OpenAI, bfl: FakeBflUpstream
) -> None:
    body = refused(
        lambda: client.images.edit(image=distinct_images(9), prompt="x", model="flux-2-pro")
    )
    assert (body["param"], body["code"]) == ("image", "too_many_images")
    assert bfl.hits == []


def test_flux2_klein_takes_at_most_4_images(client: OpenAI, bfl: FakeBflUpstream) -> None:
    body = refused(
        lambda: client.images.edit(image=distinct_images(5), prompt="x", model="flux-2-klein-4b")
    )
    assert body["param"] == "image"
    client.images.edit(image=distinct_images(4), prompt="x", model="flux-2-klein-9b")
    task = only_task(bfl)
    assert task.endpoint == "flux-2-klein-9b" and "input_image_4" in task.body


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"steps": "0"}, "steps"),
        ({"steps": "51"}, "steps"),
        ({"steps": "12.5"}, "steps"),
        ({"guidance": "1.4"}, "guidance"),
        ({"guidance": "10.01"}, "guidance"),
        ({"guidance": "nan"}, "guidance"),
        ({"safety_tolerance": "6"}, "safety_tolerance"),
        ({"output_format": "webp"}, "output_format"),
    ],
)
def test_flux2_flex_ranges_are_checked_before_bfl(
    client: OpenAI, bfl: FakeBflUpstream, extra: dict[str, str], param: str
) -> None:
    body = refused(
        lambda: client.images.edit(
            image=distinct_images(1), prompt="x", model="flux-2-flex", extra_body=extra
        )
    )
    assert body["param"] == param
    assert bfl.hits == []


def test_flux2_flex_steps_and_guidance_reach_bfl(client: OpenAI, bfl: FakeBflUpstream) -> None:
    client.images.edit(
        image=distinct_images(2),
        prompt="crisp lettering",
        model="flux-2-flex",
        extra_body={"steps": "30", "guidance": "2.5", "prompt_upsampling": "false", "seed": "7"},
    )
    task = only_task(bfl)
    assert task.endpoint == "flux-2-flex"
    assert (task.body["steps"], task.body["guidance"]) == (30, 2.5)
    assert task.body["prompt_upsampling"] is False and task.body["seed"] == 7


def test_flux2_steps_are_not_a_pro_field(client: OpenAI, bfl: FakeBflUpstream) -> None:
    # Only flex takes steps (BFL's reference): for pro it is an unknown field, never sent.
    client.images.edit(
        image=distinct_images(1), prompt="x", model="flux-2-pro", extra_body={"steps": "30"}
    )
    assert "steps" not in only_task(bfl).body


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"size": "1000x1000"}, "size"),  # not multiples of 16
        ({"size": "4096x2048"}, "size"),  # over 4 MP
        ({"size": "1024x1024", "extra_body": {"aspect_ratio": "1:1"}}, "aspect_ratio"),
    ],
)
def test_flux2_size_rules_are_a_400_before_bfl(
    client: OpenAI, bfl: FakeBflUpstream, request_fields: dict[str, Any], param: str
) -> None:
    body = refused(
        lambda: client.images.edit(
            image=distinct_images(1), prompt="x", model="flux-2-pro", **request_fields
        )
    )
    assert body["param"] == param
    assert bfl.hits == []


def test_flux_kontext_keeps_working(client: OpenAI, bfl: FakeBflUpstream) -> None:
    client.images.edit(
        image=distinct_images(3), prompt="x", model="flux-kontext-max", size="1024x1536"
    )
    task = only_task(bfl)
    assert task.endpoint == "flux-kontext-max"
    assert task.body["aspect_ratio"] == "2:3" and "width" not in task.body
    assert {"input_image", "input_image_2", "input_image_3"} <= set(task.body)
    assert task.body["prompt_upsampling"] is False


def test_flux2_generation_is_a_task_without_input_image(
    client: OpenAI, bfl: FakeBflUpstream
) -> None:
    client.images.generate(model="flux-2-pro", prompt="a lighthouse", size="1024x1792")
    task = only_task(bfl)
    assert not any(name.startswith("input_image") for name in task.body)
    assert (task.body["width"], task.body["height"]) == (1024, 1792)
