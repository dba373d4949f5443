"""The upstream dialects by the `type` an upstream's config names, and how each one is built.

Adding a dialect is one module implementing app/upstream/base.Upstream and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import httpx

from app.config.settings import UpstreamConfig
from app.observability.redaction import Redactor
from app.upstream.azure import AzureUpstream
from app.upstream.base import Upstream
from app.upstream.bfl import BflUpstream
from app.upstream.demo import DemoUpstream
from app.upstream.gemini import GeminiUpstream
from app.upstream.openai import OpenAIUpstream

# name, the upstream's config, the shared HTTP client, the redactor of secrets in its errors.
Build = Callable[[str, UpstreamConfig, httpx.AsyncClient, Redactor], Upstream]


@dataclass(frozen=True, slots=True)
class Dialect:
    build: Build
    # Whether each call takes one of the upstream's keys from the pool (the demo needs none).
    keyed: bool = True


def _demo(name: str, _config: UpstreamConfig, _client: httpx.AsyncClient, _: Redactor) -> Upstream:
    return DemoUpstream(name)


DIALECTS: Mapping[str, Dialect] = {
    "openai": Dialect(OpenAIUpstream),
    "bfl": Dialect(BflUpstream),
    "azure": Dialect(AzureUpstream),
    "gemini": Dialect(GeminiUpstream),
    "demo": Dialect(_demo, keyed=False),
}
