"""The model catalog: per-model rules and the upstreams that serve each model (config/models.yaml).

Model rules are data, not code: resellers and OpenAI add and retire names every few months, so
adding a model is a config edit.
"""

from __future__ import annotations

import re
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

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
        "complexity",
        "frame_count",
        "frame_duration_ms",
    }
)
# Provider fields outside OpenAI's API (Flux's; Gemini's image_size). A model that declares one in
# its params gets it validated like a known field; for any other model it stays an unknown field,
# passed through.
PROVIDER_PARAMS = frozenset(
    {"seed", "safety_tolerance", "prompt_upsampling", "steps", "guidance", "image_size"}
)
# The files an edit can carry besides its images: what a combination rule may name too.
OVERLAY_FILES = frozenset({"mask", "markup"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CustomSize(_Strict):
    """Any WxH within these bounds (newer GPT image models)."""

    multiple_of: int = Field(16, gt=0)
    max_edge: int = Field(3840, gt=0)
    # Only third-party references give a lower bound (655,360 for gpt-image-2): a setting.
    min_pixels: int = Field(0, ge=0)
    max_pixels: int = Field(3840 * 2160, gt=0)
    max_ratio: float = Field(3.0, ge=1.0)


class Combination(_Strict):
    """What sending a field needs from the other fields, and what it rules out.

    `requires`: other field -> the values it must have (as sent, or its default when not sent);
    a violation names the field that carries the rule. `excludes`: fields or files (`mask`,
    `markup`, `stream`...) that may not be sent with it; a violation names the excluded one.
    """

    requires: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    excludes: tuple[str, ...] = ()

    @field_validator("requires", mode="before")
    @classmethod
    def _values_as_text(cls, value: Any) -> Any:
        # YAML reads `n: [1]` as integers; values are compared as the text a form carries.
        if isinstance(value, dict):
            return {
                key: [_text(item) for item in items] if isinstance(items, list) else items
                for key, items in value.items()
            }
        return value


class ParamRule(Combination):
    # number: a decimal such as Flux's guidance (1.5-10); int takes whole numbers only.
    kind: Literal["enum", "int", "number", "bool", "size", "text"]
    values: tuple[str, ...] = ()
    min: int | float | None = None
    max: int | float | None = None
    default: str | bool | int | float | None = None
    custom: CustomSize | None = None
    # Rules that hold only for some values of this field (e.g. output_format: gif).
    when: dict[str, Combination] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _values_for_enum(self) -> ParamRule:
        if self.kind == "enum" and not self.values:
            raise ValueError("an enum parameter needs values")
        for value in self.when:
            if self.kind == "enum" and value not in self.values:
                raise ValueError(f"when.{value}: not one of the values")
        return self

    def combinations(self, value: str) -> tuple[Combination, ...]:
        """The rules that apply when this field is sent with `value`."""
        specific = self.when.get(value)
        return (self,) if specific is None else (self, specific)


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


class MarkupRules(Combination):
    """A markup edit: a transparent PNG of annotations, sized like the first image; its
    combination rules hold whenever one is sent."""

    allowed: bool = False
    max_bytes: ByteSize = ByteSize(4 * 1024 * 1024)
    # OpenAI: "Cannot be combined with mask".
    excludes: tuple[str, ...] = ("mask",)


class ModelPrice(_Strict):
    """Upstream list prices in USD, for usage cost estimates (tokens from the answer's usage).

    Input is priced by kind when the answer splits it (`usage.input_tokens_details`): text, image,
    and the cached share of each. A rate left out falls back to the one above it: image input to
    text input, cached input to uncached, so a model priced with one input rate stays as before.
    """

    per_image: Decimal = Field(Decimal(0), ge=0)
    per_million_input_tokens: Decimal = Field(Decimal(0), ge=0)
    per_million_cached_input_tokens: Decimal | None = Field(None, ge=0)
    per_million_image_input_tokens: Decimal | None = Field(None, ge=0)
    per_million_cached_image_input_tokens: Decimal | None = Field(None, ge=0)
    per_million_output_tokens: Decimal = Field(Decimal(0), ge=0)
    # What one image may cost at most, in tokens, for the worst case a spend budget reserves
    # before the call (app/tenants/budgets.py); the answer's `usage` prices the call after it.
    # Settings, not facts: the defaults are OpenAI's published gpt-image-1 counts at their
    # largest (high quality at 1536x1024 is 6,240 output tokens; high input fidelity adds up to
    # as many per input image). A model whose sizes go beyond should set more.
    max_input_tokens_per_image: int = Field(6240, ge=0)  # per input image (and mask, markup)
    max_output_tokens_per_image: int = Field(6240, ge=0)  # per image made

    @property
    def text_input(self) -> Decimal:
        return self.per_million_input_tokens

    @property
    def cached_text_input(self) -> Decimal:
        return _first(self.per_million_cached_input_tokens, self.per_million_input_tokens)

    @property
    def image_input(self) -> Decimal:
        return _first(self.per_million_image_input_tokens, self.per_million_input_tokens)

    @property
    def cached_image_input(self) -> Decimal:
        return _first(self.per_million_cached_image_input_tokens, self.image_input)


def _first(value: Decimal | None, fallback: Decimal) -> Decimal:
    return fallback if value is None else value


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- Black Forest Labs: how the `bfl` dialect (app/upstream/bfl.py) speaks for a model ---

# Fields the size mode sends (width/height or aspect_ratio), never listed in `fields`.
_BFL_SIZE_FIELDS = frozenset({"size", "aspect_ratio"})
_BFL_ENDPOINT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)*$")


class BflSize(_Strict):
    """How the model takes its output size. `aspect_ratio` (FLUX.1 Kontext): the client's
    aspect_ratio (or one translated from size) as it is. `width_height` (FLUX.2): a WxH size as
    width and height, checked against these bounds; an aspect_ratio becomes the largest
    dimensions with its ratio within `ratio_pixels` (app/upstream/bfl_size.py)."""

    mode: Literal["aspect_ratio", "width_height"]
    multiple_of: int = Field(16, gt=0)
    min_side: int = Field(64, gt=0)
    max_pixels: int = Field(4 * 1024 * 1024, gt=0)
    ratio_pixels: int = Field(1024 * 1024, gt=0)

    @model_validator(mode="after")
    def _ratio_within_cap(self) -> BflSize:
        if self.ratio_pixels > self.max_pixels:
            raise ValueError("ratio_pixels: must not exceed max_pixels")
        if self.min_side * self.min_side > self.ratio_pixels:
            raise ValueError("min_side: a square of min_side must fit in ratio_pixels")
        return self


class BflModel(_Strict):
    """A model's wire rules on Black Forest Labs' task API. Every BFL model is a row like this
    in config/models.yaml, so a new one is a config edit."""

    # Path of the task endpoint under the upstream's base_url; default: the upstream_model.
    endpoint: str | None = None
    # Reference images it takes: input_image, then input_image_2 .. input_image_<max_images>.
    max_images: int = Field(ge=0)
    size: BflSize
    # Params sent as they are, the client's value or else the param's default (`seed` differs
    # per task when n > 1). Each must be one of the model's params, with its range there.
    fields: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _well_formed(self) -> BflModel:
        if self.endpoint is not None and not _BFL_ENDPOINT.match(self.endpoint):
            raise ValueError("endpoint: a path such as flux-2-pro (no scheme, no leading /)")
        for name in self.fields:
            if name in _BFL_SIZE_FIELDS:
                raise ValueError(f"fields: {name} is sent by the size mode, not listed")
        return self


class ModelRule(_Strict):
    name: str
    upstream_model: str
    upstreams: tuple[str, ...]
    owned_by: str = "openai"
    prompt_max_chars: int = Field(32000, gt=0)
    images: ImageRules = ImageRules()
    mask: MaskRules = MaskRules()
    markup: MarkupRules = MarkupRules()
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
    # Needed for a model a `bfl` upstream serves (checked at startup, app/upstream/bfl.py).
    bfl: BflModel | None = None

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
        for name in self.bfl.fields if self.bfl else ():
            if name not in self.params:
                raise ValueError(f"bfl.fields: {name} is not in params (its range goes there)")
        self._check_combinations()
        return self

    def _check_combinations(self) -> None:
        """Every field a combination rule names must be one this model can be sent."""
        nameable = set(self.params) | OVERLAY_FILES | {"stream", "partial_images"}
        rules: list[tuple[str, Combination]] = [("markup", self.markup)]
        for name, rule in self.params.items():
            rules.append((f"params.{name}", rule))
            rules += [(f"params.{name}.when.{value}", c) for value, c in rule.when.items()]
        for where, combination in rules:
            for other in combination.requires:
                if other not in self.params:
                    raise ValueError(f"{where}.requires.{other}: not in params")
            for other in combination.excludes:
                if other not in nameable:
                    raise ValueError(f"{where}.excludes: {other!r} is not a field of this model")


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
