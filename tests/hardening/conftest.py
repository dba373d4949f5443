"""Fixtures for the hardening tests: a gateway with small size limits and its own spool dir."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.config.settings import Limits, Settings
from app.main import create_app
from tests.fakes.openai_upstream import FakeOpenAIUpstream
from tests.hardening.corpus import SMALL_LIMITS
from tests.support.gateway_env import gateway_settings
from tests.support.servers import serve_in_thread


@dataclass(frozen=True)
class SmallGateway:
    url: str
    spool_dir: Path
    settings: Settings


def small_settings(upstream_url: str, spool_dir: Path, **limits: object) -> Settings:
    settings = gateway_settings(upstream_url)
    return settings.model_copy(
        update={
            "limits": Limits.model_validate({**SMALL_LIMITS, "spool_dir": str(spool_dir), **limits})
        }
    )


@pytest.fixture(scope="session")
def small_gateway(fake_upstream: FakeOpenAIUpstream) -> Iterator[SmallGateway]:
    with tempfile.TemporaryDirectory(prefix="gw-spool-") as spool:
        settings = small_settings(fake_upstream.url, Path(spool))
        with serve_in_thread(create_app(settings)) as url:
            yield SmallGateway(url, Path(spool), settings)
