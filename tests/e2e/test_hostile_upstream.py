"""End to end against a hostile upstream: the real OpenAI SDK -> the gateway -> raw bytes. The
gateway on its own transport answers what the same gateway on httpx's default transport (the
reference) answers, except where tests/unit/upstream/test_hostile_upstream.py says why not; and the
upstream receives exactly one POST per edit whatever failed after it was sent, though the
gateway has a second key and retries allowed (a resend would be billed twice)."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from app.config.settings import load_settings
from app.main import create_app
from tests.support import images
from tests.support.gateway_config import write_gateway_config
from tests.support.gateway_env import gateway_env
from tests.support.raw_upstream import RawUpstream, Script, raw_upstream_in_thread, reset
from tests.support.sdk import sdk_client
from tests.support.servers import serve_in_thread

PNG = images.png(32, 32)
RESULT = json.dumps(
    {"created": 1764000000, "data": [{"b64_json": base64.b64encode(PNG).decode()}]}
).encode()
TOTAL_SECONDS = 2  # the upstream's timeouts.total: a silent upstream is a 504 after it


def head(extra: bytes = b"", length: int | None = len(RESULT)) -> bytes:
    framing = b"content-length: %d\r\n" % length if length is not None else b""
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + framing + extra + b"\r\n"


def chunked(extension: bytes = b"", trailer: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
        + b"%x%s\r\n%s\r\n0\r\n%s\r\n" % (len(RESULT), extension, RESULT, trailer)
    )


def every_request(answer: bytes, then: str = "") -> Script:
    async def script(
        upstream: RawUpstream, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            await upstream.read_request(reader)
            if answer:
                writer.write(answer)
                await writer.drain()
            if then == "reset":
                await asyncio.sleep(0.05)
                reset(writer)
                return
            if then == "close":
                return
            if then == "stall":
                await asyncio.sleep(TOTAL_SECONDS * 3)
                return

    return script


@dataclass(frozen=True)
class Case:
    id: str
    script: Script
    # (status, error code or None) the client sees: the same through both gateways unless
    # `ours` says otherwise (see tests/unit/upstream/test_hostile_upstream.py for why).
    expected: tuple[int, str | None]
    ours: tuple[int, str | None] | None = None
    edits: int = 1
    # POSTs the upstream sees per edit: one, unless the answer was a complete one the retry
    # policy may send again (a 3xx is treated like a 5xx: retried once, on the other key).
    posts_per_edit: int = 1


LOST = (502, "upstream_connection_lost")
CASES = [
    Case("plain-answer", every_request(head() + RESULT), (200, None)),
    Case(
        "extra-bytes-after-response",
        every_request(head() + RESULT + b"garbage\r\n"),
        (200, None),
        ours=LOST,
    ),
    Case(
        "two-responses-joined",
        every_request(head() + RESULT + head() + RESULT),
        (200, None),
        edits=2,
    ),
    Case(
        "reset-mid-body-without-length",
        every_request(head(length=None) + RESULT[:100], then="reset"),
        LOST,
    ),
    Case(
        "read-whole-then-closed", every_request(head() + RESULT, then="close"), (200, None), edits=2
    ),
    Case(
        "body-longer-than-content-length",
        every_request(head() + RESULT + b" and more"),
        (200, None),
        ours=LOST,
    ),
    Case("nul-in-header", every_request(head(b"x-a: a\x00b\r\n") + RESULT), LOST),
    Case(
        "chunk-extensions-and-trailers", every_request(chunked(b";a=b", b"x-t: 1\r\n")), (200, None)
    ),
    Case(
        "bad-chunk-size",
        every_request(head(b"transfer-encoding: chunked\r\n", None) + b"zz\r\n"),
        LOST,
    ),
    Case(
        "content-length-and-transfer-encoding",
        every_request(chunked().replace(b"\r\n\r\n", b"\r\ncontent-length: 9\r\n\r\n", 1)),
        (200, None),
        ours=LOST,
    ),
    Case(
        "duplicate-content-length",
        every_request(head(b"content-length: %d\r\n" % len(RESULT)) + RESULT),
        (200, None),
        ours=LOST,
    ),
    Case(
        "informational-first",
        every_request(b"HTTP/1.1 100 Continue\r\n\r\n" + head() + RESULT),
        (200, None),
    ),
    Case(
        "slow-loris-head",
        every_request(b"HTTP/1.1 200 OK\r\nx-a: ", then="stall"),
        (504, "upstream_timeout"),
    ),
    Case(
        "redirect-with-a-location-httpx-cannot-parse",
        every_request(
            b"HTTP/1.1 302 Found\r\nlocation: https:\\\\127.0.0.1\\x\r\ncontent-length: 0\r\n\r\n"
        ),
        (502, "upstream_error"),
        posts_per_edit=2,
    ),
    Case(
        "redirect-with-a-usable-location",
        every_request(b"HTTP/1.1 302 Found\r\nlocation: /elsewhere\r\ncontent-length: 0\r\n\r\n"),
        (502, "upstream_error"),
        posts_per_edit=2,
    ),
    Case("closed-without-an-answer", every_request(b"", then="close"), LOST),
    Case("reset-without-an-answer", every_request(b"", then="reset"), LOST),
]


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # config/gateway.yaml's retry policy (4 attempts, a 5xx retried once) and two keys: a failure
    # the gateway took for "never sent" would be sent again.
    return write_gateway_config(
        tmp_path_factory.mktemp("hostile"),
        upstreams={
            "default": {
                "type": "openai",
                "base_url": "http://unused",
                "keys_env": "GATEWAY_UPSTREAM_KEYS",
                "timeouts": {"connect": 2, "total": TOTAL_SECONDS},
            }
        },
    )


@contextmanager
def gateway(upstream_url: str, config: Path, reference: bool) -> Iterator[OpenAI]:
    settings = load_settings(env=gateway_env(upstream_url, GATEWAY_CONFIG=str(config)))
    transport = httpx.AsyncHTTPTransport() if reference else None
    with serve_in_thread(create_app(settings, transport=transport)) as url:
        yield sdk_client(url)


def outcome(client: OpenAI) -> tuple[int, str | None]:
    try:
        client.images.edit(image=("a.png", PNG, "image/png"), prompt="a hostile upstream")
    except openai.APIStatusError as exc:
        body = exc.body if isinstance(exc.body, dict) else {}
        return exc.status_code, body.get("code")
    return 200, None


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_the_gateway_answers_a_hostile_upstream_as_the_reference_and_posts_once(
    case: Case, config: Path
) -> None:
    seen: dict[str, list[tuple[int, str | None]]] = {}
    posts: dict[str, int] = {}
    for name in ("reference", "ours"):
        with raw_upstream_in_thread(case.script) as upstream:
            with gateway(upstream.url + "/v1", config, reference=name == "reference") as client:
                seen[name] = [outcome(client) for _ in range(case.edits)]
            posts[name] = upstream.posts("/v1/images/edits")
    assert seen["reference"] == [case.expected] * case.edits
    assert seen["ours"] == [case.ours or case.expected] * case.edits
    assert posts["ours"] == case.edits * case.posts_per_edit
