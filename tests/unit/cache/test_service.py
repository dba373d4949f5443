"""Unit: EditCache with the in-process store and a scripted forward function."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest

from app.cache.service import EditCache, for_upstream, policy_from_header
from app.cache.store import MemoryStore
from app.config.settings import CacheConfig, load_settings
from app.config.yaml_source import ConfigError
from app.intake.request import EditRequest
from app.routing.forwarder import AttemptNote
from app.upstream.base import PartialSink, UpstreamAnswer
from tests.support import images
from tests.support.constants import CONFIG
from tests.support.gateway_env import gateway_env
from tests.unit.cache.builders import edit

RESULT = images.png(8, 8, colour=(1, 2, 3))


class ScriptedUpstream:
    def __init__(self) -> None:
        self.calls: list[EditRequest] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(
        self,
        request: EditRequest,
        *,
        on_partial: PartialSink | None = None,
        on_attempt: AttemptNote | None = None,
    ) -> UpstreamAnswer:
        self.calls.append(request)
        await self.gate.wait()
        body: dict[str, Any] = {
            "created": 1,
            "data": [{"b64_json": base64.b64encode(RESULT).decode()}],
        }
        return UpstreamAnswer(body=body, request_id="req_up")


async def _no_fetch(url: str) -> bytes:
    raise AssertionError("nothing to fetch")


def cache(upstream: ScriptedUpstream, **config: Any) -> EditCache:
    return EditCache(
        store=MemoryStore(max_bytes=1 << 20),
        forward=upstream,
        fetch=_no_fetch,
        config=CacheConfig(**config),
        call_seconds=lambda _: 60.0,
    )


class Releases:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def test_service_cancelled_request_does_not_cancel_the_paid_call() -> None:
    async def scenario() -> None:
        upstream = ScriptedUpstream()
        upstream.gate.clear()
        service = cache(upstream)
        request, released = edit({"prompt": "x"}), Releases()
        waiting = asyncio.create_task(
            service.run(request, release=released, policy="normal", client_scope=None)
        )
        while not upstream.calls:
            await asyncio.sleep(0)
        waiting.cancel()  # the client went away (or the server cancelled its handler)
        await asyncio.gather(waiting, return_exceptions=True)
        assert released.count == 0  # the paid call still owns the uploads
        upstream.gate.set()
        await service.aclose(grace=30)
        assert released.count == 1
        again = await service.run(
            edit({"prompt": "x"}), release=Releases(), policy="normal", client_scope=None
        )
        assert again.x_cache == "hit" and again.result.images[0].data == RESULT
        assert len(upstream.calls) == 1

    asyncio.run(scenario())


def test_service_releases_uploads_once_on_every_path() -> None:
    async def scenario() -> None:
        upstream = ScriptedUpstream()
        service = cache(upstream)
        for policy in ("normal", "normal", "refresh", "bypass"):
            released = Releases()
            await service.run(
                edit({"prompt": "x"}), release=released, policy=policy, client_scope=None
            )
            assert released.count == 1, policy
        assert len(upstream.calls) == 3  # the second "normal" was a hit

    asyncio.run(scenario())


def test_service_concurrent_identical_edits_in_one_process_join_one_call() -> None:
    async def scenario() -> None:
        upstream = ScriptedUpstream()
        upstream.gate.clear()
        service = cache(upstream)
        runs = [
            asyncio.create_task(
                service.run(
                    edit({"prompt": "x"}), release=Releases(), policy="normal", client_scope=None
                )
            )
            for _ in range(10)
        ]
        while not upstream.calls:
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        upstream.gate.set()
        outcomes = await asyncio.gather(*runs)
        assert len(upstream.calls) == 1
        assert sorted(o.x_cache for o in outcomes) == ["hit"] * 9 + ["miss"]

    asyncio.run(scenario())


def test_service_disabled_cache_bypasses_everything() -> None:
    async def scenario() -> None:
        upstream = ScriptedUpstream()
        service = cache(upstream, enabled=False)
        for _ in range(2):
            outcome = await service.run(
                edit({"prompt": "x"}), release=Releases(), policy="normal", client_scope=None
            )
            assert outcome.x_cache == "bypass"
        assert len(upstream.calls) == 2

    asyncio.run(scenario())


def test_service_asks_upstreams_that_take_response_format_for_bytes() -> None:
    dalle = edit(
        {"prompt": "x", "model": "dall-e-2", "response_format": "url"},
        [("image", images.png(64, 64, mode="RGBA"), "a.png")],
    )
    assert for_upstream(dalle).params["response_format"] == "b64_json"
    gpt = edit({"prompt": "x", "response_format": "url"})
    assert "response_format" not in for_upstream(gpt).params  # GPT image upstreams reject it


def test_policy_from_header_reads_no_cache_and_no_store() -> None:
    assert policy_from_header(None) == "normal"
    assert policy_from_header("max-age=0") == "normal"
    assert policy_from_header("No-Cache") == "refresh"
    assert policy_from_header("no-cache, no-store") == "bypass"
    assert policy_from_header("private, no-store") == "bypass"


def test_config_rejects_a_per_model_ttl_for_an_unknown_model(tmp_path: Path) -> None:
    text = CONFIG.read_text().replace("model_ttl_seconds: {}", "model_ttl_seconds: {nope: 5}")
    text = text.replace("catalog: models.yaml", f"catalog: {CONFIG.parent / 'models.yaml'}")
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=r"cache\.model_ttl_seconds: 'nope'"):
        load_settings(env=gateway_env("http://127.0.0.1:9/v1", GATEWAY_CONFIG=str(config)))
