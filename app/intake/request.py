"""A validated, normalized images request (an edit, or a generation from the prompt alone): what
flows from validation on to the cache, the router and the upstream dialect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from app.config.catalog import ModelRule, ResponseFormat
from app.intake.sniff import ImageInfo
from app.intake.spool import SpooledUpload

ParamValue = str | int | float | bool
# One request type for both: the two share every step but the upstream endpoint, and a
# generation is simply a request without images.
Operation = Literal["edit", "generation"]


@dataclass(frozen=True, slots=True)
class ImageInput:
    upload: SpooledUpload
    info: ImageInfo
    param: str  # how errors name it: "image", "image[1]", "mask", "markup"

    @property
    def sha256(self) -> str:
        return self.upload.sha256


@dataclass(frozen=True, slots=True)
class EditRequest:
    model: ModelRule
    prompt: str
    images: tuple[ImageInput, ...]
    mask: ImageInput | None
    # Known fields after validation and translation, typed; only those the upstream accepts.
    params: dict[str, ParamValue]
    # Fields the gateway does not know, passed through as sent.
    extra_fields: tuple[tuple[str, str], ...]
    # What the client asked for; None means the model's own default.
    response_format: ResponseFormat | None
    n: int
    operation: Operation = "edit"
    # A markup edit's annotation layer (a transparent PNG sized like the first image).
    markup: ImageInput | None = None
    # Streaming shapes the answer, not the image: kept out of params (and the cache key). The
    # OpenAI dialect streams from upstreams whose model declares `stream`; others are emulated.
    stream: bool = False
    partial_images: int = 0

    @property
    def event_prefix(self) -> str:
        """What SSE event types start with: `image_edit` or `image_generation`."""
        return "image_edit" if self.operation == "edit" else "image_generation"
