"""The bfl dialect on its own, against the fake BFL API on a real port: the failure kinds and
headers the key pool acts on, for every way a task can go wrong."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from app.config.settings import UpstreamConfig
from app.errors import GatewayError
from app.intake.request import EditRequest, ImageInput
from app.intake.sniff import HEAD_BYTES, TAIL_BYTES, sniff_image
from app.intake.spool import SpooledUpload
from app.observability.redaction import Redactor
from app.upstream.base import UpstreamAnswer, UpstreamKey
from app.upstream.bfl import BflUpstream
from app.upstream.url_guard import Resolver, UrlGuard
from tests.fakes.bfl_upstream import FakeBflUpstream, SubmitReply
from tests.support import images
from tests.support.bfl_gateway import BFL_KEYS, bfl_settings, write_bfl_config
from tests.support.counting_listener import CountingListener
from tests.support.rerouting import PUBLIC_ADDRESS, Rerouting
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


def run_edit(
    config: UpstreamConfig,
    edit: EditRequest,
    key: UpstreamKey = KEY,
    *,
    resolver: Resolver | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> UpstreamAnswer:
    async def go() -> UpstreamAnswer:
        async with httpx.AsyncClient(transport=transport) as client:
            guard = (
                None if resolver is None else UrlGuard.from_config(config.bfl, resolver=resolver)
            )
            upstream = BflUpstream("bfl", config, client, Redactor(BFL_KEYS), guard=guard)
            return await upstream.edit(edit, key)

    return asyncio.run(go())


def failure_of(
    config: UpstreamConfig, edit: EditRequest, key: UpstreamKey = KEY, **seams: Any
) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        run_edit(config, edit, key, **seams)
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
        # After BFL accepted the task, so paid for: `accepted`, which routing never resubmits.
        (("Error",), 502, "accepted"),
        (("Task not found",), 502, "accepted"),
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
    assert (error.status_code, error.failure) == (504, "accepted")
    assert error.headers["x-should-retry"] == "false"


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
        "accepted",  # refused after BFL accepted (and billed) the task
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


# What the tests' resolver answers: one pretend-public name (rerouted to the fake BFL), the
# rest leading to loopback or the metadata address in the forms IPv6 can carry them.
ANSWERS = {
    "api.bfl.test": [PUBLIC_ADDRESS],
    "mapped.bfl.test": ["::ffff:127.0.0.1"],
    "compatible.bfl.test": ["::127.0.0.1"],
    "nat64.bfl.test": ["64:ff9b::a9fe:a9fe"],
    "sixtofour.bfl.test": [PUBLIC_ADDRESS, "2002:a9fe:a9fe::"],
    "teredo.bfl.test": ["2001:0:4136:e378:8000:63bf:80ff:fffe"],
}
HOSTILE = [
    ("http://[::ffff:127.0.0.1]:{port}", "non-public address"),
    ("http://[::127.0.0.1]:{port}", "non-public address"),
    ("http://[64:ff9b::a9fe:a9fe]:{port}", "non-public address"),
    ("http://[64:ff9b:1::a9fe:a9fe]:{port}", "non-public address"),
    ("http://[2002:7f00:1::]:{port}", "non-public address"),
    ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]:{port}", "non-public address"),
    *[(f"http://{name}:{{port}}", "non-public address") for name in list(ANSWERS)[1:]],
    ("http://api.bfl.test:22", "port 22 is not an allowed port"),
    ("http://api.bfl.test:0", "port 0 is not an allowed port"),
    ("http://api.bfl.test:99999", "port 99999 is not an allowed port"),
]


async def resolve(host: str, port: int) -> list[str]:
    return ANSWERS[host]


def strict_config(config: UpstreamConfig, *ports: int) -> UpstreamConfig:
    """Production rules (no private addresses), any host name, these ports."""
    bfl = config.bfl.model_copy(
        update={"allowed_hosts": ("*",), "allowed_ports": ports, "allow_private_addresses": False}
    )
    return config.model_copy(update={"bfl": bfl})


@pytest.mark.parametrize(("base", "reason"), HOSTILE)
def test_bfl_upstream_polling_url_to_a_refused_address_or_port_connects_nowhere(
    tmp_path: Path, bfl: FakeBflUpstream, base: str, reason: str
) -> None:
    config, edit = upstream_config(tmp_path, bfl.url)
    with CountingListener("127.0.0.1") as listener:
        bfl.polling_base = base.format(port=listener.port)
        error = failure_of(strict_config(config, listener.port), edit, resolver=resolve)
        assert listener.count == 0
    assert (error.status_code, error.failure, error.code) == (
        502,
        "accepted",  # refused after BFL accepted (and billed) the task
        "upstream_url_refused",
    )
    assert reason in error.message and "polling URL" in error.message
    assert [hit.method for hit in bfl.hits] == ["POST"]


@pytest.mark.parametrize(("base", "reason"), HOSTILE)
def test_bfl_upstream_result_url_to_a_refused_address_or_port_connects_nowhere(
    tmp_path: Path, bfl: FakeBflUpstream, base: str, reason: str
) -> None:
    """Polling goes to a public name (rerouted to the fake); the result URL is refused."""
    config, edit = upstream_config(tmp_path, bfl.url)
    fake_port = httpx.URL(bfl.url).port
    assert fake_port is not None
    transport = Rerouting(bfl.url)
    with CountingListener("127.0.0.1") as listener:
        bfl.polling_base = f"http://api.bfl.test:{fake_port}"
        bfl.sample_base = base.format(port=listener.port)
        strict = strict_config(config, fake_port, listener.port)
        error = failure_of(strict, edit, resolver=resolve, transport=transport)
        assert listener.count == 0
    assert (error.status_code, error.code) == (502, "upstream_url_refused")
    assert reason in error.message and "result URL" in error.message
    # The submit (to the configured base URL), then only polls at the vetted address.
    assert transport.addresses[0] == "127.0.0.1"
    assert set(transport.addresses[1:]) == {PUBLIC_ADDRESS}
    assert any(hit.path == "/v1/get_result" for hit in bfl.hits)
    assert not any(hit.path.startswith("/results/") for hit in bfl.hits)


@pytest.fixture(scope="module")
def bad_redirector() -> Iterator[str]:
    """Answers everything with a redirect whose Location httpx cannot parse."""

    async def redirect(request: Any) -> Response:
        return Response(status_code=302, headers={"location": "https:\\\\127.0.0.1\\x"})

    with serve_in_thread(Starlette(routes=[Route("/{path:path}", redirect)])) as url:
        yield url


@pytest.mark.parametrize("what", ["polling", "result"])
def test_bfl_upstream_unparseable_redirect_is_an_upstream_error_not_a_crash(
    tmp_path: Path, bfl: FakeBflUpstream, bad_redirector: str, what: str
) -> None:
    config, edit = upstream_config(tmp_path, bfl.url)
    ports = (httpx.URL(bfl.url).port, httpx.URL(bad_redirector).port)
    bfl_rules = config.bfl.model_copy(update={"allowed_ports": ports})
    config = config.model_copy(update={"bfl": bfl_rules})
    if what == "polling":
        bfl.polling_base = bad_redirector
    else:
        bfl.sample_base = bad_redirector
    error = failure_of(config, edit)
    assert (error.status_code, error.failure, error.code) == (
        502,
        "accepted",  # refused after BFL accepted (and billed) the task
        "upstream_url_refused",
    )
    assert f"{what} URL" in error.message and "cannot be parsed" in error.message
    assert "\\" not in error.message
