"""A validated, normalized image edit: what flows from validation on to the router and upstream."""

from __future__ import annotations

from dataclasses import dataclass

from app.catalog import ModelRule, ResponseFormat
from app.intake.sniff import ImageInfo
from app.intake.spool import SpooledUpload

ParamValue = str | int | bool


@dataclass(frozen=True, slots=True)
class ImageInput:
    upload: SpooledUpload
    info: ImageInfo
    param: str  # how errors name it: "image", "image[1]", "mask"

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
