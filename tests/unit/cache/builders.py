"""Validated EditRequests built in memory, as the intake and validation would hand them over."""

from __future__ import annotations

from app.config.catalog import Catalog
from app.config.settings import load_settings
from app.intake.form import IntakeForm, TextField
from app.intake.request import EditRequest
from app.intake.spool import SpooledUpload
from app.intake.validation import validate_edit
from tests.support import images
from tests.support.gateway_env import gateway_env


def catalog() -> Catalog:
    return load_settings(env=gateway_env("http://127.0.0.1:9/v1")).catalog


def upload(field: str, data: bytes, filename: str = "a.png") -> SpooledUpload:
    spooled = SpooledUpload(field, filename, threshold=1 << 20, spool_dir=None)
    spooled.write(data)
    return spooled


def edit(
    fields: dict[str, str],
    files: list[tuple[str, bytes, str]] | None = None,
) -> EditRequest:
    form = IntakeForm(
        fields=[TextField(name, value) for name, value in fields.items()],
        files=[upload(f, d, n) for f, d, n in (files or [("image", images.png(), "a.png")])],
    )
    return validate_edit(form, catalog(), default_model="gpt-image-1.5", max_pixels=10**8)
