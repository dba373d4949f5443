"""The dialect registry: every upstream `type` the config accepts is built by its own dialect."""

from __future__ import annotations

from typing import get_args

import httpx

from app.config.settings import UpstreamConfig
from app.observability.redaction import Redactor
from app.upstream.bfl import BflUpstream
from app.upstream.demo import DemoUpstream
from app.upstream.openai import OpenAIUpstream
from app.upstream.registry import DIALECTS


def test_registry_has_a_dialect_for_every_upstream_type() -> None:
    assert set(DIALECTS) == set(get_args(UpstreamConfig.model_fields["type"].annotation))


def test_registry_builds_each_type_and_only_the_demo_goes_without_keys() -> None:
    config = UpstreamConfig(base_url="https://api.example.test/v1")
    client = httpx.AsyncClient()
    built = {
        kind: dialect.build(f"up-{kind}", config, client, Redactor([]))
        for kind, dialect in DIALECTS.items()
    }
    assert isinstance(built["openai"], OpenAIUpstream)
    assert isinstance(built["bfl"], BflUpstream)
    assert isinstance(built["demo"], DemoUpstream)
    assert {kind: upstream.name for kind, upstream in built.items()} == {
        kind: f"up-{kind}" for kind in DIALECTS
    }
    assert {kind for kind, dialect in DIALECTS.items() if not dialect.keyed} == {"demo"}
