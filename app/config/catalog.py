"""The model catalog: per-model rules and the upstreams that serve each model (config/models.yaml).

Model rules are data, not code: resellers and OpenAI add and retire names every few months, so
adding a model is a config edit.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, ValidationError, model_validator

from app.config.yaml_source import ConfigError, format_validation_error, read_yaml

ImageFormat = Literal["png", "jpeg", "webp"]
ResponseFormat = Literal["b64_json", "url"]

# Fields of the images API the gateway understands. A field in this set must be allowed by the
# model's rules; anything else is an unknown text field and is passed through unchanged.
KNOWN_PARAMS = frozenset(
    {
        "n",
        "size",
        "aspect_ratio",
        "quality",
        "response_format",
        "background",
        "moderation",
        "output_format",
        "output_compression",
        "input_fidelity",
        "partial_images",
        "stream",
        "user",
        "safety_identifier",
    }
)
# Provider fields outside OpenAI's API (Flux's; Gemini's image_size). A model that declares one in
# its params gets it validated like a known field; for any other model it stays an unknown field,
# passed through.
PROVIDER_PARAMS = frozenset({"seed", "safety_tolerance", "prompt_upsampling", "image_size"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CustomSize(_Strict):
    """Any WxH within these bounds (newer GPT image models)."""

    multiple_of: int = Field(16, gt=0)
    max_edge: int = Field(3840, gt=0)
    max_pixels: int = Field(3840 * 2160, gt=0)
    max_ratio: float = Field(3.0, ge=1.0)


class ParamRule(_Strict):
    kind: Literal["enum", "int", "bool", "size", "text"]
    values: tuple[str, ...] = ()
    min: int | None = None
    max: int | None = None
    default: str | int | bool | None = None
    custom: CustomSize | None = None

    @model_validator(mode="after")
    def _values_for_enum(self) -> ParamRule:
        if self.kind == "enum" and not self.values:
            raise ValueError("an enum parameter needs values")
        return self


class Translation(_Strict):
    """Rename a client field for the upstream, mapping its values (e.g. aspect_ratio -> size)."""

    to: str
    # A value mapped to null drops the field (e.g. Flux has no equivalent of size=auto).
    map: dict[str, str | None]


class ImageRules(_Strict):
    max_count: int = Field(16, ge=1)
    max_bytes: ByteSize = ByteSize(50 * 1024 * 1024)
    formats: tuple[ImageFormat, ...] = ("png", "jpeg", "webp")
    square: bool = False
    # Width x height per image, below the gateway-wide cap (BFL takes at most 20 MP).
    max_pixels: int | None = Field(None, gt=0)


class MaskRules(_Strict):
    allowed: bool = True
    max_bytes: ByteSize = ByteSize(4 * 1024 * 1024)


class ModelPrice(_Strict):
    """Upstream list prices in USD, for usage cost estimates (tokens from the answer's usage)."""

    per_image: Decimal = Field(Decimal(0), ge=0)
    per_million_input_tokens: Decimal = Field(Decimal(0), ge=0)
    per_million_output_tokens: Decimal = Field(Decimal(0), ge=0)


class ModelRule(_Strict):
    name: str
    upstream_model: str
    upstreams: tuple[str, ...]
    owned_by: str = "openai"
    prompt_max_chars: int = Field(32000, gt=0)
    images: ImageRules = ImageRules()
    mask: MaskRules = MaskRules()
    response_formats: tuple[ResponseFormat, ...] = ("b64_json",)
    params: dict[str, ParamRule] = Field(default_factory=dict)
    # Fields accepted from the client but never forwarded (the upstream rejects them).
    strip: tuple[str, ...] = ()
    translate: dict[str, Translation] = Field(default_factory=dict)
    timeout: float | None = Field(None, gt=0)
    # For usage cost estimates only; a model without a price costs 0.
    price: ModelPrice = ModelPrice()
    # Resend after a read timeout or a connection lost mid-request. Off by default: the edit may
    # be running, and billed, upstream.
    resend_after_timeout: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> ModelRule:
        if not self.upstreams:
            raise ValueError("a model needs at least one upstream")
        for name in self.params:
            if name not in KNOWN_PARAMS and name not in PROVIDER_PARAMS:
                raise ValueError(f"params.{name}: not a known images API field")
        for source in self.translate:
            if source not in self.params:
                raise ValueError(f"translate.{source}: the field is not in params")
        return self


class Catalog(_Strict):
    models: dict[str, ModelRule]

    def get(self, name: str) -> ModelRule | None:
        return self.models.get(name)

    def upstreams_in_use(self) -> set[str]:
        return {upstream for model in self.models.values() for upstream in model.upstreams}

    @cached_property
    def max_image_bytes(self) -> int:
        """The largest upload any model takes (read on every request, so computed once)."""
        return max(int(model.images.max_bytes) for model in self.models.values())


def load_catalog(path: Path, *, known_upstreams: set[str]) -> Catalog:
    raw = read_yaml(path)
    for key in raw:
        if key != "models" and not str(key).startswith("x-"):
            raise ConfigError(f"{path}: {key}: unknown key (only `models` and `x-*` are allowed)")
    models_raw = raw.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        raise ConfigError(f"{path}: models: expected a non-empty mapping of model names")
    models: dict[str, Any] = {}
    for name, body in models_raw.items():
        if not isinstance(body, dict):
            raise ConfigError(f"{path}: models.{name}: expected a mapping")
        models[str(name)] = {"name": str(name), "upstream_model": str(name), **body}
    try:
        catalog = Catalog.model_validate({"models": models})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None
    for model in catalog.models.values():
        for upstream in model.upstreams:
            if upstream not in known_upstreams:
                raise ConfigError(
                    f"{path}: models.{model.name}.upstreams: {upstream!r} is not an upstream "
                    f"in the gateway config (known: {', '.join(sorted(known_upstreams))})"
                )
    return catalog
