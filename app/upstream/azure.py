"""The Azure OpenAI dialect: OpenAI's images wire format (app/upstream/openai.py, composed, not
copied) on Azure's paths, with the key in an `api-key` header and Azure's content-filter refusals
answered as OpenAI's `moderation_blocked`.

Two URL forms, as Azure documents them (docs/upstreams.md cites the pages):
  deployments  {base}/openai/deployments/{deployment}/images/edits?api-version={api_version}
  v1           {base}/openai/v1/images/edits, the deployment named in the body's `model`
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode

import httpx

from app.intake.request import EditRequest
from app.observability.redaction import Redactor
from app.upstream.base import PartialSink, UpstreamAnswer, UpstreamKey
from app.upstream.openai import Call, OpenAIUpstream

if TYPE_CHECKING:
    from app.config.settings import AzureSettings, UpstreamConfig

# The api-version of the deployments form when the config names none: the version Azure's image
# edit how-to uses for gpt-image-1 (edits, mask, several images, streaming).
DEFAULT_API_VERSION = "2025-04-01-preview"
# Azure's codes for a prompt or image its content filter refused: `contentFilter` (image API),
# `content_filter` (400, with innererror.code ResponsibleAIPolicyViolation),
# `content_policy_violation` (OpenAI's own spelling, which Azure also answers).
_FILTER_CODES = frozenset({"contentFilter", "content_filter", "content_policy_violation"})
_FILTER_INNER_CODE = "ResponsibleAIPolicyViolation"


class AzureTarget:
    """Where each call goes on one Azure OpenAI resource, and its `api-key` header."""

    def __init__(self, base_url: str, settings: AzureSettings) -> None:
        self._base = base_url.rstrip("/")
        self._form = settings.api_form
        version = settings.api_version
        if version is None and self._form == "deployments":
            version = DEFAULT_API_VERSION
        self._query = "" if version is None else "?" + urlencode({"api-version": version})

    def url(self, call: Call, model: str) -> str:
        if self._form == "v1":
            return f"{self._base}/openai/v1/{call}{self._query}"
        if call == "models":
            return f"{self._base}/openai/models{self._query}"
        return f"{self._base}/openai/deployments/{quote(model, safe='')}/{call}{self._query}"

    def auth_headers(self, key: UpstreamKey) -> dict[str, str]:
        return {"api-key": key.secret.get_secret_value()}


def rejection_code(error: dict[str, Any]) -> str | None:
    """`moderation_blocked` for Azure's content-filter refusals, else None (its own code)."""
    if error.get("code") in _FILTER_CODES:
        return "moderation_blocked"
    for name in ("innererror", "inner_error"):
        inner = error.get(name)
        if isinstance(inner, dict) and inner.get("code") == _FILTER_INNER_CODE:
            return "moderation_blocked"
    return None


class AzureUpstream:
    def __init__(
        self, name: str, config: UpstreamConfig, client: httpx.AsyncClient, redactor: Redactor
    ) -> None:
        self.name = name
        self._deployments = config.azure.deployments
        self._wire = OpenAIUpstream(
            name,
            config,
            client,
            redactor,
            target=AzureTarget(config.base_url, config.azure),
            rejection_code=rejection_code,
        )

    def deployment(self, edit: EditRequest) -> str:
        """The deployment serving the edit's model: the config's `deployments` entry for the
        public model name, else the model's `upstream_model`."""
        return self._deployments.get(edit.model.name, edit.model.upstream_model)

    async def probe(self, key: UpstreamKey) -> bool:
        return await self._wire.probe(key)

    async def edit(
        self, edit: EditRequest, key: UpstreamKey | None, *, on_partial: PartialSink | None = None
    ) -> UpstreamAnswer:
        # The deployment is the model as Azure knows it: in the path, and in the body's `model`
        # (which the v1 form routes by).
        model = edit.model.model_copy(update={"upstream_model": self.deployment(edit)})
        return await self._wire.edit(replace(edit, model=model), key, on_partial=on_partial)
