"""JSON request bodies: generations, and edits whose images come as data URLs or https URLs.

The body is read under the multipart limits; its images become SpooledUploads and its other
fields text fields, so validation and everything after it cannot tell a JSON edit from a
multipart one.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson

from app.config.settings import Limits
from app.errors import GatewayError, InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from app.intake.form import IntakeForm, TextField, paced_body
from app.intake.spool import SpooledUpload, SpoolWorker

# Downloads an https image URL (the SSRF-guarded ImageFetcher); None when that is switched off.
FetchUrl = Callable[[str], Awaitable[bytes]]


def is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def read_json_object(
    chunks: AsyncIterator[bytes], *, content_type: str | None, limits: Limits
) -> dict[str, Any]:
    """The body as a JSON object, refused with 413 the moment it passes the body limit."""
    if not is_json(content_type):
        raise UnsupportedMediaType("The body must be application/json.")
    max_body = int(limits.max_body_bytes)
    body = bytearray()
    paced = paced_body(chunks, idle=limits.body_idle_timeout, total=limits.body_timeout)
    try:
        async for chunk in paced:
            body += chunk
            if len(body) > max_body:
                raise PayloadTooLarge(
                    f"The request body is larger than {max_body} bytes.",
                    code="body_too_large",
                    headers={"connection": "close"},
                )
    finally:
        await paced.aclose()
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise InvalidRequest("The body is not valid JSON.", code="invalid_json") from None
    if not isinstance(value, dict):
        raise InvalidRequest("The body must be a JSON object.", code="invalid_json")
    return value


def text_fields(body: dict[str, Any], *, skip: tuple[str, ...] = ()) -> list[TextField]:
    """Scalars as the text a multipart form would carry; validation types them again."""
    fields: list[TextField] = []
    for name, value in body.items():
        if name in skip or value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float | str):
            text = str(value)
        else:
            shown = name[:100]
            raise InvalidRequest(
                f"Invalid type for {shown!r}: expected a string, number or boolean.",
                param=shown,
                code="invalid_type",
            )
        fields.append(TextField(name, text))
    return fields


class JsonEditReader:
    """Turns a JSON edit's `images`, `mask` and `markup` into spooled uploads, under the upload
    limits."""

    def __init__(
        self,
        limits: Limits,
        *,
        max_file_bytes: int,
        fetch_url: FetchUrl | None,
        worker: SpoolWorker | None = None,
        hash_uploads: bool = True,
    ) -> None:
        self._limits = limits
        self._max_file_bytes = max_file_bytes
        self._fetch_url = fetch_url
        self._worker = worker
        self._hash_uploads = hash_uploads

    async def form(self, body: dict[str, Any]) -> IntakeForm:
        form = IntakeForm(fields=text_fields(body, skip=("images", "image", "mask", "markup")))
        try:
            for param, field_name, reference in _image_references(body):
                data = await self._image_bytes(reference, param)
                form.files.append(await self._spooled(field_name, data))
        except BaseException:
            form.close()
            raise
        return form

    async def _image_bytes(self, reference: dict[str, Any], param: str) -> bytes:
        if "file_id" in reference:
            raise InvalidRequest(
                f"{param}.file_id: this gateway has no Files API; send the image as "
                "`image_url` (a data URL, or https when enabled) or as a multipart upload.",
                param=param,
                code="unsupported_parameter",
            )
        url = reference.get("image_url")
        if not isinstance(url, str) or not url:
            raise InvalidRequest(
                f"{param} needs an `image_url` (a data URL or an https URL).",
                param=param,
                code="missing_required_parameter",
            )
        if url[:5].lower() == "data:":
            return _data_url_bytes(url, param, self._max_file_bytes)
        # Only the kind of URL is told apart here: which schemes, hosts, ports and addresses
        # may be fetched is the SSRF guard's decision (http only where image_urls.allow_http).
        if url[:8].lower() != "https://" and url[:7].lower() != "http://":
            raise InvalidRequest(
                f"{param}.image_url must be a data: URL or an https:// URL.",
                param=param,
                code="invalid_image_url",
            )
        if self._fetch_url is None:
            raise InvalidRequest(
                f"{param}.image_url: this gateway does not fetch image URLs; send a data URL "
                "or a multipart upload.",
                param=param,
                code="image_url_disabled",
            )
        try:
            data = await self._fetch_url(url)
        except GatewayError as exc:
            # The client chose the URL: a refusal is their request's fault, not a 5xx.
            raise InvalidRequest(
                f"{param}.image_url: {exc.message}", param=param, code="invalid_image_url"
            ) from None
        if len(data) > self._max_file_bytes:
            raise _too_large(param, self._max_file_bytes)
        return data

    async def _spooled(self, field_name: str, data: bytes) -> SpooledUpload:
        upload = SpooledUpload(
            field_name,
            None,
            threshold=int(self._limits.spool_threshold_bytes),
            spool_dir=self._limits.spool_dir,
            worker=self._worker,
            hash_on_arrival=self._hash_uploads,
        )
        try:
            upload.write(data)
            await upload.settled()
        except BaseException:
            upload.close()
            raise
        return upload


def _image_references(body: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(param for errors, multipart field name, reference) for each image, the mask and the
    markup (both image references like those in `images`)."""
    if "image" in body and "images" not in body:
        raise InvalidRequest(
            'A JSON edit sends its images as `images: [{"image_url": ...}]`.',
            param="image",
            code="invalid_type",
        )
    images = body.get("images")
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(item, dict) for item in images):
        raise InvalidRequest(
            'images must be a list of objects like {"image_url": "data:image/png;base64,..."}.',
            param="images",
            code="invalid_type",
        )
    found = [(f"images[{i}]", f"image[{i}]", item) for i, item in enumerate(images)]
    for overlay in ("mask", "markup"):
        reference = body.get(overlay)
        if reference is None:
            continue
        if not isinstance(reference, dict):
            raise InvalidRequest(
                f'{overlay} must be an object like {{"image_url": "data:image/png;base64,..."}}.',
                param=overlay,
                code="invalid_type",
            )
        found.append((overlay, overlay, reference))
    return found


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InvalidRequest(
            f"{param}.image_url is not a base64 data URL (data:image/png;base64,...).",
            param=param,
            code="invalid_image_url",
        )
    # Refused before decoding: base64 is 4 characters per 3 bytes.
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise _too_large(param, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(
            f"{param}.image_url holds invalid base64.", param=param, code="invalid_image_url"
        ) from None
    if len(data) > max_bytes:
        raise _too_large(param, max_bytes)
    return data


def _too_large(param: str, max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{param} is larger than {max_bytes} bytes.", param=param, code="file_too_large"
    )
