"""Secrets never leave the gateway: a full scenario (success, upstream 400/401/429/500, a dropped
connection, validation errors, timeouts, a wrong client key) runs with known keys, against a
gateway in a subprocess (its stderr captured) and one in-process (every logger captured at DEBUG);
no key appears in any response body or header, log line, exception text, metric or Redis entry."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import APIStatusError

from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream, RecordedRequest, Reply
from tests.hardening import multipart as mp
from tests.hardening.raw_http import connect, head, read_response
from tests.support import images
from tests.support.constants import CLIENT_KEY, REPO, UPSTREAM_KEYS
from tests.support.gateway_env import gateway_env, gateway_settings
from tests.support.redis_topologies import sync_redis
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, serve_in_thread, wait_for_port

SECOND_CLIENT_KEY = "igw-second-client-key-zyxwvu987654"
WRONG_CLIENT_KEY = "igw-wrong-client-key-qwerty555555"
ADMIN_KEY = "igw-admin-key-for-secrets-test-4242"
METRICS_TOKEN = "igw-metrics-token-secrets-test-7777"
SECRETS = (CLIENT_KEY, SECOND_CLIENT_KEY, ADMIN_KEY, METRICS_TOKEN, *UPSTREAM_KEYS)
SECRET_ENV = {
    "GATEWAY_CLIENT_KEYS": f"{CLIENT_KEY},{SECOND_CLIENT_KEY}",
    "GATEWAY_ADMIN_KEYS": ADMIN_KEY,
    "GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
    "GATEWAY_CACHE_ENABLED": "true",
}
UPSTREAM_TIMEOUT = 1.0


def fragments(secret: str) -> list[str]:
    """The whole secret and its distinctive tail (what a masked echo like `sk-...Xy12` keeps)."""
    return [secret, secret[-10:]]


def assert_clean(where: str, text: str) -> None:
    for secret in SECRETS:
        for fragment in fragments(secret):
            assert fragment not in text, f"{where} leaks a secret ({fragment[:6]}...)"


def echoing_upstream(status: int, **extra: object) -> object:
    """An upstream that quotes the key it was given, as real ones do in auth errors."""

    def reply(record: RecordedRequest) -> Reply:
        key = record.key or ""
        message = f"Incorrect API key provided: {key}. Key {key[:8]}...{key[-10:]} is invalid."
        body = {"error": {"message": message, "type": f"t-{key}", "param": key, "code": key}}
        return Reply(status=status, body=body, headers={"x-echo": key[-10:]}, **extra)  # type: ignore[arg-type]

    return reply


def run_scenario(base_url: str, upstream: FakeOpenAIUpstream) -> list[str]:
    """Drive the gateway through every path; return everything a client could see."""
    seen: list[str] = []
    client = sdk_client(base_url)
    image = ("a.png", images.png(64, 64), "image/png")

    def record(response: httpx.Response) -> None:
        seen.append(f"{response.status_code} {dict(response.headers)} {response.text}")

    raw = client.images.with_raw_response.edit(image=image, prompt="ok")
    record(raw.http_response)

    failures: list[tuple[object, dict[str, object]]] = [
        (echoing_upstream(400), {}),
        (echoing_upstream(401), {}),
        (echoing_upstream(403), {}),
        (echoing_upstream(402), {}),
        (echoing_upstream(429), {}),
        (echoing_upstream(500), {}),
        (echoing_upstream(503), {}),
        (lambda _r: Reply(body=b"not json " + UPSTREAM_KEYS[0].encode()), {}),
        (lambda _r: Reply(status=500, body=UPSTREAM_KEYS[1].encode()), {}),
        (lambda _r: Reply(drop_connection=True), {}),
        (lambda _r: Reply(delay=UPSTREAM_TIMEOUT + 1.5), {}),
        (None, {"n": "0"}),
        (None, {"model": "no-such-model"}),
        (None, {"size": CLIENT_KEY}),
        (None, {"model": UPSTREAM_KEYS[0]}),
    ]
    for responder, extra in failures:
        upstream.reset()
        upstream.responder = responder  # type: ignore[assignment]
        try:
            client.images.edit(image=image, prompt="x", extra_body=extra)
        except APIStatusError as exc:
            seen += [str(exc), repr(exc), repr(exc.body)]
            record(exc.response)
        else:
            seen.append("no error")
    upstream.reset()

    wrong = sdk_client(base_url, key=WRONG_CLIENT_KEY)
    try:
        wrong.images.edit(image=image, prompt="x")
    except APIStatusError as exc:
        seen += [str(exc), repr(exc.body)]
        record(exc.response)

    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    with httpx.Client(base_url=base_url, timeout=30) as http:
        for path in ("/healthz", "/readyz", "/v1/models", "/metrics", "/nope", "/admin/keys"):
            record(http.get(path, headers=headers))
        for key in (ADMIN_KEY, CLIENT_KEY):
            for path in ("/admin/keys", "/admin/pool", "/admin/"):
                record(http.get(path, headers={"Authorization": f"Bearer {key}"}))
        scrape = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scrape.status_code == 200 and "gateway_requests_in_flight" in scrape.text
        record(scrape)
        body = mp.encode([mp.file("image", images.png()), mp.text("prompt", "x")])
        bad = http.post(
            "/v1/images/edits",
            content=body,
            headers={**headers, "content-type": "multipart/form-data; boundary=" + "k" * 80},
        )
        record(bad)

    # A body that stalls: 408 after the idle timeout.
    with connect(base_url) as sock:
        sock.sendall(
            head(
                "POST",
                "/v1/images/edits",
                {**headers, "Content-Type": mp.content_type(), "Content-Length": "1000"},
            )
        )
        stalled = read_response(sock)
        assert stalled.status == 408
        seen.append(f"{stalled.headers} {stalled.body!r}")
    return seen


def write_config(directory: Path) -> Path:
    config = directory / "gateway.yaml"
    config.write_text(
        f"catalog: {REPO / 'config' / 'models.yaml'}\n"
        "default_model: gpt-image-1.5\n"
        "upstreams:\n"
        "  default:\n"
        "    type: openai\n"
        "    keys_env: GATEWAY_UPSTREAM_KEYS\n"
        f"    timeouts: {{connect: 2, total: {UPSTREAM_TIMEOUT}}}\n"
        "limits:\n"
        "  body_idle_timeout: 0.5\n",
        encoding="utf-8",
    )
    return config


def redis_dump(url: str) -> str:
    db = sync_redis(url)
    out = []
    for key in db.scan_iter(count=1000):
        kind = db.type(key)
        value: object
        if kind == b"string":
            value = db.get(key)
        elif kind == b"hash":
            value = db.hgetall(key)
        elif kind == b"list":
            value = db.lrange(key, 0, -1)
        elif kind == b"set":
            value = db.smembers(key)
        elif kind == b"zset":
            value = db.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = db.xrange(key)
        else:
            value = kind
        out.append(f"{key!r} {value!r}")
    db.close()
    return "\n".join(out)


@pytest.fixture
def subprocess_gateway(
    fake_upstream: FakeOpenAIUpstream, redis_url: str
) -> Iterator[tuple[str, Path]]:
    with tempfile.TemporaryDirectory(prefix="gw-secrets-") as tmp:
        directory = Path(tmp)
        port = free_port()
        env = {
            **os.environ,
            **gateway_env(
                fake_upstream.url,
                GATEWAY_CONFIG=str(write_config(directory)),
                GATEWAY_REDIS_URL=redis_url,
                **SECRET_ENV,
            ),
        }
        log_path = directory / "gateway.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "app.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                ],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                wait_for_port(port)
                yield f"http://127.0.0.1:{port}", log_path
            finally:
                process.terminate()
                process.wait(timeout=30)


def test_secrets_never_leave_a_gateway_process(
    subprocess_gateway: tuple[str, Path], upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    url, log_path = subprocess_gateway
    seen = run_scenario(url, upstream)
    for item in seen:
        assert_clean("a response or client exception", item)
    stored = redis_dump(redis_url)
    assert "igw:" in stored  # the cache really wrote there
    assert_clean("Redis", stored)
    log = log_path.read_text(encoding="utf-8", errors="replace")
    assert "/v1/images/edits" in log and "gateway.access" in log  # the access log was captured
    assert_clean("the gateway's output", log)
    assert "Traceback" not in log


def test_secrets_never_reach_any_logger_in_process(
    fake_upstream: FakeOpenAIUpstream,
    upstream: FakeOpenAIUpstream,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    settings = gateway_settings(
        fake_upstream.url,
        GATEWAY_CONFIG=str(write_config(tmp_path)),
        **SECRET_ENV,
    )
    caplog.set_level(logging.DEBUG)
    with serve_in_thread(create_app(settings)) as url:
        seen = run_scenario(url, upstream)
    for item in seen:
        assert_clean("a response or client exception", item)
    assert len(caplog.records) > 50  # debug logging really was on
    for record in caplog.records:
        text = caplog.handler.format(record)
        if record.name.startswith("tests.") or "fake upstream" in text:
            continue
        assert_clean(f"log record {record.name}", text)
    assert_clean("repr of the settings", repr(settings) + str(settings))
