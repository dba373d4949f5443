"""Acceptance (issue 5): the result cache, single-flight, spend safety and hosted image URLs,
through the real OpenAI SDK, against a real Redis server and the fake upstream on real ports."""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from app.config.settings import Settings
from app.main import create_app
from tests.fakes.openai_upstream import RESULT_PNG, FakeOpenAIUpstream, Reply
from tests.support import images
from tests.support.constants import CLIENT_KEY, REPO, UPSTREAM_KEYS
from tests.support.gateway_env import gateway_env, gateway_settings
from tests.support.redis_server import PrivateRedis
from tests.support.redis_topologies import sync_redis
from tests.support.sdk import sdk_client
from tests.support.servers import free_port, serve_in_thread, wait_for_port


def cached_settings(upstream: FakeOpenAIUpstream, redis_url: str | None, **cache: Any) -> Settings:
    env: dict[str, str] = {"GATEWAY_CACHE_ENABLED": "true"}
    if redis_url is not None:
        env["GATEWAY_REDIS_URL"] = redis_url
    settings = gateway_settings(upstream.url, **env)
    fetch = settings.cache.fetch.model_copy(update=cache.pop("fetch", {}))
    return settings.model_copy(
        update={"cache": settings.cache.model_copy(update={**cache, "fetch": fetch})}
    )


@contextmanager
def gateway(settings: Settings) -> Iterator[str]:
    with serve_in_thread(create_app(settings)) as url:
        yield url


def unique_prompt() -> str:
    # One Redis serves every test: a fresh prompt keeps each test's entries its own.
    return "cache test " + uuid.uuid4().hex


def edit_raw(client: OpenAI, **kwargs: Any) -> tuple[str, Any, Any]:
    kwargs.setdefault("image", ("photo.png", images.png(), "image/png"))
    raw = client.images.with_raw_response.edit(**kwargs)
    return raw.headers.get("x-cache"), raw.headers, raw.parse()


def png_bytes(result: Any) -> list[bytes]:
    return [base64.b64decode(item.b64_json) for item in result.data]


@pytest.fixture(scope="module")
def cached_url(fake_upstream: FakeOpenAIUpstream, redis_url: str) -> Iterator[str]:
    with gateway(cached_settings(fake_upstream, redis_url)) as url:
        yield url


@pytest.fixture
def cached(cached_url: str, upstream: FakeOpenAIUpstream) -> OpenAI:
    return sdk_client(cached_url)


def test_cache_second_identical_edit_is_a_hit_with_identical_bytes(
    cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    state, headers, first = edit_raw(cached, prompt=prompt)
    assert state == "miss" and headers["age"] == "0"
    state, headers, second = edit_raw(cached, prompt=prompt, n=1)  # n=1 is the default
    assert state == "hit"
    assert int(headers["age"]) >= 0
    assert png_bytes(second) == png_bytes(first) == [RESULT_PNG]
    # A hit spent nothing upstream: its usage has the original's shape, every count 0.
    assert first.usage is not None and first.usage.total_tokens > 0
    assert second.usage is not None
    assert second.usage.model_dump().keys() == first.usage.model_dump().keys()
    assert (second.usage.input_tokens, second.usage.output_tokens) == (0, 0)
    assert second.usage.total_tokens == 0
    assert second.usage.input_tokens_details.model_dump() == {"image_tokens": 0, "text_tokens": 0}
    assert len(upstream.edits) == 1


def test_cache_any_change_to_images_mask_prompt_or_params_misses(
    cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    source = images.png(64, 64, mode="RGBA")
    changed_pixel = _with_pixel(source, (5, 5), (10, 120, 201, 255))
    mask = images.mask_png(64, 64)
    other_mask = _with_pixel(mask, (60, 60), (0, 0, 0, 0))

    def send(**changes: Any) -> str:
        kwargs: dict[str, Any] = {
            "image": ("a.png", source, "image/png"),
            "mask": ("m.png", mask, "image/png"),
            "prompt": prompt,
        }
        kwargs.update(changes)
        state, _, _ = edit_raw(cached, **kwargs)
        return str(state)

    assert send() == "miss"
    assert send() == "hit"
    variants: list[dict[str, Any]] = [
        {"image": ("a.png", changed_pixel, "image/png")},
        {"mask": ("m.png", other_mask, "image/png")},
        {"prompt": prompt + "!"},
        {"n": 2},
        {"size": "1024x1024"},
        {"quality": "low"},
        {"background": "opaque"},
        {"output_format": "webp"},
        {"model": "gpt-image-1"},
        {"extra_body": {"moderation": "low"}},
    ]
    for changes in variants:
        assert send(**changes) == "miss", changes
    assert len(upstream.edits) == 1 + len(variants)


def _with_pixel(png: bytes, where: tuple[int, int], colour: tuple[int, ...]) -> bytes:
    picture = Image.open(io.BytesIO(png)).convert("RGBA")
    picture.putpixel(where, colour)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def test_cache_same_image_under_another_filename_and_content_type_hits(
    cached_url: str, cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    source = images.png(48, 48)
    state, _, first = edit_raw(cached, prompt=prompt, image=("holiday.png", source, "image/png"))
    assert state == "miss"
    response = httpx.post(
        cached_url + "/v1/images/edits",
        headers={"authorization": f"Bearer {CLIENT_KEY}"},
        data={"prompt": prompt},
        files=[("image[]", ("IMG_0001.bin", source, "application/octet-stream"))],
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-cache"] == "hit"
    assert base64.b64decode(response.json()["data"][0]["b64_json"]) == png_bytes(first)[0]
    assert len(upstream.edits) == 1


def test_cache_twenty_concurrent_identical_edits_make_one_upstream_call(
    cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    upstream.responder = lambda request: Reply(delay=1.5)
    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: edit_raw(cached, prompt=prompt), range(20)))
    assert len(upstream.edits) == 1
    assert all(png_bytes(result) == [RESULT_PNG] for _, _, result in results)
    assert sorted(state for state, _, _ in results).count("miss") == 1


def test_cache_no_cache_refreshes_and_no_store_neither_reads_nor_writes(
    cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    fresh = images.png(16, 16, colour=(0, 0, 250))
    upstream.enqueue(Reply(), Reply(body=_b64_answer(fresh)))
    assert edit_raw(cached, prompt=prompt)[0] == "miss"
    state, _, refreshed = edit_raw(
        cached, prompt=prompt, extra_headers={"Cache-Control": "no-cache"}
    )
    assert state == "miss" and png_bytes(refreshed) == [fresh]
    state, _, after = edit_raw(cached, prompt=prompt)
    assert state == "hit" and png_bytes(after) == [fresh]  # the entry was refreshed
    assert len(upstream.edits) == 2

    # no-store with an entry present: not read (upstream called), and nothing written.
    state, _, _ = edit_raw(cached, prompt=prompt, extra_headers={"Cache-Control": "no-store"})
    assert state == "bypass" and len(upstream.edits) == 3
    assert png_bytes(edit_raw(cached, prompt=prompt)[2]) == [fresh]

    other = unique_prompt()
    assert (
        edit_raw(cached, prompt=other, extra_headers={"cache-control": "No-Store"})[0] == "bypass"
    )
    assert edit_raw(cached, prompt=other)[0] == "miss"  # no-store wrote nothing
    assert len(upstream.edits) == 5


def _b64_answer(png: bytes) -> dict[str, Any]:
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode()}]}


def test_cache_client_giving_up_and_retrying_pays_for_one_upstream_call(
    cached: OpenAI, cached_url: str, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    upstream.enqueue(Reply(delay=3.0))
    impatient = sdk_client(cached_url, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.images.edit(image=("a.png", images.png(), "image/png"), prompt=prompt)
    # The SDK's retry (same request again) joins the call still running upstream.
    state, _, result = edit_raw(cached, prompt=prompt)
    assert png_bytes(result) == [RESULT_PNG]
    assert state == "hit"
    assert len(upstream.edits) == 1
    # And once it is done, it is stored: later retries hit without another call.
    assert edit_raw(cached, prompt=prompt)[0] == "hit"
    assert len(upstream.edits) == 1


def test_cache_client_disconnect_before_answer_still_stores_the_paid_result(
    cached_url: str, cached: OpenAI, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    store = sync_redis(redis_url)
    entries_before = len(list(store.scan_iter(match="igw:c1:*:entry", count=1000)))
    prompt = unique_prompt()
    upstream.enqueue(Reply(delay=1.5))
    with pytest.raises(openai.APITimeoutError):
        sdk_client(cached_url, timeout=0.5).images.edit(
            image=("a.png", images.png(), "image/png"), prompt=prompt
        )
    # Nobody waits for the answer any more; the paid call still lands and is stored.
    deadline = time.monotonic() + 20
    while len(list(store.scan_iter(match="igw:c1:*:entry", count=1000))) == entries_before:
        assert time.monotonic() < deadline, "the abandoned edit was never stored"
        time.sleep(0.1)
    state, _, result = edit_raw(cached, prompt=prompt)
    assert state == "hit" and png_bytes(result) == [RESULT_PNG]
    assert len(upstream.edits) == 1


def test_cache_url_format_serves_gateway_hosted_png_for_base64_only_upstream(
    cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    state, _, result = edit_raw(cached, prompt=prompt, response_format="url")
    assert state == "miss"
    url = result.data[0].url
    assert url.startswith(str(cached.base_url).removesuffix("/v1/") + "/v1/images/files/")
    assert url.endswith(".png")
    (sent,) = upstream.edits
    assert "response_format" not in sent.field_map()  # GPT image upstreams reject it
    fetched = httpx.get(url)  # no Authorization: the id is the capability
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert fetched.content == RESULT_PNG
    # The same entry answers b64_json too (bytes are stored once, rendered per request).
    state, _, again = edit_raw(cached, prompt=prompt, response_format="b64_json")
    assert state == "hit" and png_bytes(again) == [RESULT_PNG]


def test_cache_dall_e_2_default_answers_a_hosted_url(
    cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    result = cached.images.edit(
        image=("a.png", images.png(64, 64, mode="RGBA"), "image/png"),
        prompt=unique_prompt(),
        model="dall-e-2",
    )
    assert result.data[0].url and "/v1/images/files/" in result.data[0].url
    (sent,) = upstream.edits
    assert sent.field_map()["response_format"] == "b64_json"  # bytes asked for, not a URL
    assert httpx.get(result.data[0].url).content == RESULT_PNG


@pytest.fixture(scope="module")
def image_host() -> Iterator[str]:
    """A plain file server standing in for an upstream's result bucket."""
    large = images.noise_png(64, 64)

    async def serve(request: Any) -> Response:
        name = request.path_params["name"]
        if name == "moved.png":
            return Response(status_code=302, headers={"location": "/files/result.png"})
        if name == "large.png":
            return Response(large, media_type="image/png")
        return Response(RESULT_PNG, media_type="image/png")

    app = Starlette(routes=[Route("/files/{name}", serve)])
    with serve_in_thread(app) as url:
        yield url


def on_port_of(server: str) -> dict[str, Any]:
    """Fetch settings reaching a plain-http test server: its port allowed, http allowed."""
    return {"allowed_ports": (httpx.URL(server).port,), "allow_http": True}


def _url_answer(url: str) -> Reply:
    return Reply(body={"created": int(time.time()), "data": [{"url": url}]})


def test_cache_b64_json_for_an_upstream_that_answers_only_urls(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str, image_host: str
) -> None:
    settings = cached_settings(
        fake_upstream, redis_url, fetch={**on_port_of(image_host), "allow_private_addresses": True}
    )
    with gateway(settings) as url:
        client = sdk_client(url)
        upstream.enqueue(_url_answer(image_host + "/files/moved.png"))
        prompt = unique_prompt()
        result = client.images.edit(
            image=("a.png", images.png(), "image/png"),
            prompt=prompt,
            model="flux-kontext-pro",
            response_format="b64_json",
        )
        assert png_bytes(result) == [RESULT_PNG]
        # The upstream's URL expires within the hour; the gateway's own URL lives with the entry.
        state, _, hosted = edit_raw(
            client, prompt=prompt, model="flux-kontext-pro", response_format="url"
        )
        assert state == "hit" and httpx.get(hosted.data[0].url).content == RESULT_PNG
        assert len(upstream.edits) == 1


def test_cache_upstream_url_on_loopback_is_refused_unless_allowed(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str, image_host: str
) -> None:
    # The image host is allowed (it is the upstream's own host) and http is allowed here, but
    # it resolves to loopback: refused without allow_private_addresses, never fetched.
    settings = cached_settings(fake_upstream, redis_url, fetch=on_port_of(image_host))
    with gateway(settings) as url:
        upstream.enqueue(_url_answer(image_host + "/files/result.png"))
        with pytest.raises(openai.APIStatusError) as caught:
            sdk_client(url).images.edit(
                image=("a.png", images.png(), "image/png"),
                prompt=unique_prompt(),
                model="flux-kontext-pro",
            )
    assert caught.value.status_code == 502
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "upstream_url_refused"
    assert "non-public address" in error["message"]


def test_cache_fetch_size_cap_refuses_a_large_upstream_image(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str, image_host: str
) -> None:
    settings = cached_settings(
        fake_upstream,
        redis_url,
        fetch={**on_port_of(image_host), "allow_private_addresses": True, "max_bytes": 4096},
    )
    with gateway(settings) as url:
        upstream.enqueue(_url_answer(image_host + "/files/large.png"))
        with pytest.raises(openai.APIStatusError) as caught:
            sdk_client(url).images.edit(
                image=("a.png", images.png(), "image/png"),
                prompt=unique_prompt(),
                model="flux-kontext-pro",
            )
        assert caught.value.status_code == 502
        assert "larger than 4096 bytes" in caught.value.message


def test_cache_hosted_files_are_public_only_by_exact_path_and_can_require_auth(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    with gateway(cached_settings(fake_upstream, redis_url)) as url:
        result = sdk_client(url).images.edit(
            image=("a.png", images.png(), "image/png"),
            prompt=unique_prompt(),
            response_format="url",
        )
        file_url = str(result.data[0].url)
        assert httpx.get(file_url).status_code == 200
        missing = httpx.get(file_url.replace(".png", ".jpeg"))
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "file_not_found"
        # Anything else under /v1/images/files/ (or spelled differently) still needs a key.
        for path in ("/v1/images/files/short.png", "/v1/images/files/", "//v1/images/edits"):
            assert httpx.get(url + path).status_code == 401, path
        assert httpx.post(file_url).status_code == 401
    settings = cached_settings(fake_upstream, redis_url, files_require_auth=True)
    with gateway(settings) as url:
        result = sdk_client(url).images.edit(
            image=("a.png", images.png(), "image/png"),
            prompt=unique_prompt(),
            response_format="url",
        )
        file_url = str(result.data[0].url)
        assert httpx.get(file_url).status_code == 401
        authed = httpx.get(file_url, headers={"authorization": f"Bearer {CLIENT_KEY}"})
        assert authed.status_code == 200 and authed.content == RESULT_PNG


def test_cache_public_base_url_is_used_for_hosted_urls(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    settings = cached_settings(fake_upstream, redis_url).model_copy(
        update={"public_base_url": "https://images.example.com"}
    )
    with gateway(settings) as url:
        result = sdk_client(url).images.edit(
            image=("a.png", images.png(), "image/png"),
            prompt=unique_prompt(),
            response_format="url",
        )
        hosted = str(result.data[0].url)
        assert hosted.startswith("https://images.example.com/v1/images/files/")
        assert (
            httpx.get(url + hosted.removeprefix("https://images.example.com")).content == RESULT_PNG
        )


def test_cache_redis_keys_hold_no_secrets_or_filenames(
    cached: OpenAI, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    store = sync_redis(redis_url)
    before = {key.decode() for key in store.scan_iter(count=1000)}
    edit_raw(
        cached, prompt=unique_prompt(), image=("secret-holiday.png", images.png(), "image/png")
    )
    keys = [key.decode() for key in store.scan_iter(count=1000)]
    # What the edit added: cache entries and files, and the per-client usage the gateway keeps
    # beside them. The key pool's health records (`<ns>:{pool:...}:...`) share this test Redis
    # too, and so do the keys other tests' gateways left under namespaces of their own.
    prefixes = ("igw:c1:{", "igw:f1:{", "igw:{client:")
    added = [key for key in keys if key not in before and ":{pool:" not in key]
    assert added and all(key.startswith(prefixes) for key in added)
    for key in keys:
        for secret in (CLIENT_KEY, *UPSTREAM_KEYS, "secret-holiday"):
            assert secret not in key


def test_cache_per_client_scope_keeps_clients_apart(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    second_key = "igw-test-second-client-key-0123456789"
    settings = cached_settings(fake_upstream, redis_url, scope="client")
    settings = settings.model_copy(
        update={"client_keys": (*settings.client_keys, type(settings.client_keys[0])(second_key))}
    )
    with gateway(settings) as url:
        prompt = unique_prompt()
        first = sdk_client(url)
        second = sdk_client(url, key=second_key)
        assert edit_raw(first, prompt=prompt)[0] == "miss"
        assert edit_raw(first, prompt=prompt)[0] == "hit"
        assert edit_raw(second, prompt=prompt)[0] == "miss"
        assert len(upstream.edits) == 2


def test_cache_without_redis_uses_the_in_process_store(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    with gateway(cached_settings(fake_upstream, None)) as url:
        client = sdk_client(url)
        prompt = unique_prompt()
        assert edit_raw(client, prompt=prompt)[0] == "miss"
        state, _, hit = edit_raw(client, prompt=prompt, response_format="url")
        assert state == "hit" and httpx.get(str(hit.data[0].url)).content == RESULT_PNG
        assert httpx.get(url + "/readyz").json()["checks"]["cache"] == "embedded"
        assert len(upstream.edits) == 1


def test_cache_failed_leader_does_not_poison_followers(
    cached: OpenAI, upstream: FakeOpenAIUpstream
) -> None:
    prompt = unique_prompt()
    upstream.enqueue(Reply(status=500, body={"error": {"message": "boom"}}, delay=1.0))
    with ThreadPoolExecutor(5) as pool:
        futures = [pool.submit(edit_raw, cached, prompt=prompt) for _ in range(5)]
        outcomes = []
        for future in futures:
            try:
                outcomes.append(png_bytes(future.result()[2]))
            except openai.InternalServerError:
                outcomes.append(None)
    assert outcomes.count(None) == 1  # only the leader's own request sees its failure
    assert [o for o in outcomes if o is not None] == [[RESULT_PNG]] * 4
    assert len(upstream.edits) == 2  # the failed call and one retry for all followers
    assert edit_raw(cached, prompt=prompt)[0] == "hit"


def test_cache_failures_are_not_cached(cached: OpenAI, upstream: FakeOpenAIUpstream) -> None:
    prompt = unique_prompt()
    upstream.enqueue(
        Reply(status=400, body={"error": {"message": "nope", "code": "moderation_blocked"}})
    )
    with pytest.raises(openai.BadRequestError):
        cached.images.edit(image=("a.png", images.png(), "image/png"), prompt=prompt)
    assert edit_raw(cached, prompt=prompt)[0] == "miss"
    assert len(upstream.edits) == 2


def test_cache_redis_stopped_serves_uncached_and_resumes_when_it_returns(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    server = PrivateRedis(port=free_port())
    server.start()
    try:
        settings = cached_settings(fake_upstream, server.url, redis_retry_after_seconds=0.2)
        with gateway(settings) as url:
            client = sdk_client(url)
            prompt = unique_prompt()
            assert edit_raw(client, prompt=prompt)[0] == "miss"
            assert edit_raw(client, prompt=prompt)[0] == "hit"
            assert httpx.get(url + "/readyz").json()["checks"]["cache"] == "ok"

            server.stop()
            for _ in range(3):
                state, _, result = edit_raw(client, prompt=prompt)
                assert state == "bypass" and png_bytes(result) == [RESULT_PNG]
            scrape = httpx.get(url + "/metrics", headers={"authorization": f"Bearer {CLIENT_KEY}"})
            assert _metric(scrape.text, 'gateway_redis_errors_total{component="cache"}') >= 1
            assert (
                _metric(
                    scrape.text,
                    'gateway_cache_lookups_total{model="gpt-image-1.5",result="bypass"}',
                )
                == 3
            )
            ready = httpx.get(url + "/readyz")
            assert ready.status_code == 200  # degraded, not down
            assert ready.json()["checks"]["cache"] == "degraded"
            assert ready.json()["status"] == "degraded"
            # url still works without a store: the image travels in a data URL.
            state, _, hosted = edit_raw(client, prompt=prompt, response_format="url")
            assert state == "bypass" and str(hosted.data[0].url).startswith(
                "data:image/png;base64,"
            )

            server.start()  # same port, empty (no persistence)
            deadline = time.monotonic() + 20
            while httpx.get(url + "/readyz").json()["checks"]["cache"] != "ok":
                assert time.monotonic() < deadline, "readyz never saw Redis again"
                time.sleep(0.1)
            states = []
            while time.monotonic() < deadline:
                states.append(edit_raw(client, prompt=prompt)[0])
                if states[-1] == "hit":
                    break
                time.sleep(0.25)
            assert states[-1] == "hit", states
            assert "miss" in states  # the entry was written again after the restart
    finally:
        server.stop()


def _metric(scrape: str, series: str) -> float:
    for line in scrape.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{series} not in the scrape")


def test_cache_slow_redis_times_out_and_serves_uncached(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream
) -> None:
    import socket
    import threading

    # A real socket that accepts and never answers: Redis hung, not down.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        settings = cached_settings(fake_upstream, f"redis://127.0.0.1:{port}/0")
        with gateway(settings) as url:
            state, _, result = edit_raw(sdk_client(url), prompt=unique_prompt())
            assert state == "bypass" and png_bytes(result) == [RESULT_PNG]
            ready = httpx.get(url + "/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["cache"] == "degraded"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def test_cache_two_gateway_processes_sharing_redis_make_one_upstream_call(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    env = {
        **os.environ,
        **gateway_env(fake_upstream.url, GATEWAY_REDIS_URL=redis_url),
        "GATEWAY_CACHE_ENABLED": "true",
    }
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        for port in ports:
            wait_for_port(port)
        clients = [sdk_client(f"http://127.0.0.1:{port}") for port in ports]
        prompt = unique_prompt()
        upstream.responder = lambda request: Reply(delay=2.0)
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: edit_raw(clients[i % 2], prompt=prompt), range(20)))
        assert len(upstream.edits) == 1
        assert all(png_bytes(result) == [RESULT_PNG] for _, _, result in results)
        assert [state for state, _, _ in results].count("miss") == 1
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)


def test_cache_sdk_own_timeout_retries_are_served_by_the_one_upstream_call(
    cached_url: str, upstream: FakeOpenAIUpstream
) -> None:
    # The SDK gives up after 1 s and retries by itself (same body): every attempt joins the
    # call still running upstream, and the last one gets its image. One edit, paid once.
    upstream.enqueue(Reply(delay=3.0))
    impatient = sdk_client(cached_url, timeout=1.0, max_retries=5)
    result = impatient.images.edit(
        image=("a.png", images.png(), "image/png"), prompt=unique_prompt()
    )
    assert png_bytes(result) == [RESULT_PNG]
    assert len(upstream.edits) == 1


def test_cache_results_over_max_entry_bytes_are_served_not_cached(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    with gateway(cached_settings(fake_upstream, redis_url, max_entry_bytes=64)) as url:
        client = sdk_client(url)
        prompt = unique_prompt()
        assert edit_raw(client, prompt=prompt)[0] == "miss"
        state, _, hosted = edit_raw(client, prompt=prompt, response_format="url")
        assert state == "miss"  # nothing was stored
        assert httpx.get(str(hosted.data[0].url)).content == RESULT_PNG  # url still answered
        assert len(upstream.edits) == 2


def test_cache_ttl_is_per_model(
    fake_upstream: FakeOpenAIUpstream, upstream: FakeOpenAIUpstream, redis_url: str
) -> None:
    settings = cached_settings(fake_upstream, redis_url, model_ttl_seconds={"gpt-image-1": 120})
    with gateway(settings) as url:
        client = sdk_client(url)
        ages = {}
        for model in ("gpt-image-1", "gpt-image-1.5"):
            result = client.images.edit(
                image=("a.png", images.png(), "image/png"),
                prompt=unique_prompt(),
                model=model,
                response_format="url",
            )
            served = httpx.get(str(result.data[0].url))
            ages[model] = int(served.headers["cache-control"].split("max-age=")[1].split(",")[0])
        assert 0 < ages["gpt-image-1"] <= 120
        assert 86000 < ages["gpt-image-1.5"] <= 86400
