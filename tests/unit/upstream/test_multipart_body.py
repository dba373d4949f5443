"""The re-emitted upstream body is valid multipart with the exact bytes, and replayable."""

from __future__ import annotations

import asyncio

from python_multipart.multipart import MultipartParser

from app.config.catalog import ModelRule
from app.intake.request import EditRequest, ImageInput
from app.intake.sniff import sniff_image
from app.intake.spool import SpooledUpload
from app.upstream.multipart_body import openai_edit_body
from tests.support import images


def upload(field: str, data: bytes, threshold: int) -> ImageInput:
    spooled = SpooledUpload(field, "x.png", threshold=threshold, spool_dir=None)
    for start in range(0, len(data), 1000):
        spooled.write(memoryview(data)[start : start + 1000])
    return ImageInput(spooled, sniff_image(data[:4096], data[-64:], len(data)), field)


def collect(body_stream: object) -> bytes:
    async def run() -> bytes:
        return b"".join([bytes(c) async for c in body_stream])  # type: ignore[attr-defined]

    return asyncio.run(run())


def parse(body: bytes, boundary: str) -> list[tuple[str, bytes]]:
    parts: list[tuple[str, bytes]] = []
    current: dict[str, bytes] = {}
    headers: list[bytes] = []

    def header_value(data: bytes, start: int, end: int) -> None:
        headers.append(data[start:end])

    def part_begin() -> None:
        current["data"] = b""
        headers.clear()

    def part_data(data: bytes, start: int, end: int) -> None:
        current["data"] += data[start:end]

    def part_end() -> None:
        disposition = headers[0].decode()
        name = disposition.split('name="', 1)[1].split('"', 1)[0]
        parts.append((name, current["data"]))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": part_begin,
            "on_header_value": header_value,
            "on_part_data": part_data,
            "on_part_end": part_end,
        },  # type: ignore[dict-item]
    )
    parser.write(body)
    parser.finalize()
    return parts


def test_multipart_body_round_trips_and_replays() -> None:
    first, second = images.noise_png(60, 60, seed=1), images.jpeg(30, 30)
    mask = images.mask_png(60, 60)
    edit = EditRequest(
        model=ModelRule(name="m", upstream_model="up-m", upstreams=("default",)),
        prompt="héllo",
        images=(upload("image[]", first, threshold=5000), upload("image[]", second, 10**6)),
        mask=upload("mask", mask, threshold=10),
        params={"n": 2, "stream": False, "size": "1024x1024"},
        extra_fields=(('we"ird\r\nname', "v"),),
        response_format=None,
        n=2,
    )
    body = openai_edit_body(edit)
    wire = collect(body.stream())
    assert len(wire) == body.length
    assert collect(body.stream()) == wire  # replayable for retries
    parts = parse(wire, body.boundary)
    assert parts == [
        ("model", b"up-m"),
        ("prompt", "héllo".encode()),
        ("n", b"2"),
        ("stream", b"false"),
        ("size", b"1024x1024"),
        ("we%22ird%0D%0Aname", b"v"),
        ("image[]", first),
        ("image[]", second),
        ("mask", mask),
    ]
    for image in (*edit.images, edit.mask):
        assert image is not None
        image.upload.close()
