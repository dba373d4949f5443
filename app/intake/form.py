"""Streaming multipart intake: parse the body as it arrives, enforce every size limit while
reading, hash and spool each file, and hand back the parts in arrival order.

Nothing here knows about models; it only guarantees that what it returns fits the global limits.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from app.config.settings import Limits
from app.errors import (
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from app.intake.spool import SpooledUpload, SpoolWorker

# RFC 2046: 1-70 characters from a restricted set (space allowed, but not last).
_BOUNDARY = re.compile(rb"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")

# After a limit is crossed, the rest of the body is read and thrown away (never stored) for at
# most this long, so that the client reads our 413 instead of a connection reset mid-upload.
DRAIN_SECONDS = 5.0
# Upload bytes the spool worker may have queued before intake waits for it.
MAX_SPOOL_BACKLOG_BYTES = 1024 * 1024


@dataclass
class TextField:
    name: str
    value: str


@dataclass
class IntakeForm:
    """The parts of one multipart body, in arrival order. Owns the spooled files: close() it."""

    fields: list[TextField] = field(default_factory=list)
    files: list[SpooledUpload] = field(default_factory=list)
    body_bytes: int = 0

    def close(self) -> None:
        for upload in self.files:
            upload.close()


def multipart_boundary(content_type: str | None) -> bytes:
    if not content_type:
        raise UnsupportedMediaType(
            "The body must be multipart/form-data (no Content-Type was sent)."
        )
    media_type, options = parse_options_header(content_type)
    if media_type != b"multipart/form-data":
        raise UnsupportedMediaType(
            "The body must be multipart/form-data, got "
            f"{media_type.decode('latin-1', 'replace')[:100]!r}."
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise InvalidRequest(
            "The multipart Content-Type has no boundary parameter.", code="invalid_multipart"
        )
    if not _BOUNDARY.match(boundary):
        raise InvalidRequest(
            "The multipart boundary is invalid: it must be 1-70 characters from the RFC 2046 set.",
            code="invalid_multipart",
        )
    return boundary


class _FormBuilder:
    """python-multipart callbacks that build an IntakeForm under the limits."""

    def __init__(
        self,
        limits: Limits,
        max_file_bytes: int,
        worker: SpoolWorker | None = None,
        hash_uploads: bool = True,
    ) -> None:
        self.form = IntakeForm()
        self._worker = worker
        self._hash_uploads = hash_uploads
        self._limits = limits
        self._max_file_bytes = max_file_bytes
        self._parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._text: bytearray | None = None
        self._text_name = ""
        self._upload: SpooledUpload | None = None
        self.finished = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > self._limits.max_parts:
            raise PayloadTooLarge(
                f"The form has more than {self._limits.max_parts} parts.", code="too_many_parts"
            )
        self._headers = {}
        self._header_name.clear()
        self._header_value.clear()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[bytes(self._header_name).strip().lower()] = bytes(self._header_value).strip()
        self._header_name.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidRequest(
                "A multipart part lacks `Content-Disposition: form-data; name=...`.",
                code="invalid_multipart",
            )
        name = _decode_header(options[b"name"], "part name")
        if not name.strip():
            raise InvalidRequest("A multipart part has an empty name.", code="invalid_multipart")
        if b"filename" in options:
            filename = _decode_header(options[b"filename"], "filename")
            self._upload = SpooledUpload(
                name,
                filename,
                threshold=int(self._limits.spool_threshold_bytes),
                spool_dir=self._limits.spool_dir,
                worker=self._worker,
                hash_on_arrival=self._hash_uploads,
            )
            self.form.files.append(self._upload)
        else:
            self._text = bytearray()
            self._text_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._upload is not None:
            upload = self._upload
            if upload.size + (end - start) > self._max_file_bytes:
                position = sum(1 for f in self.form.files if f.field == upload.field) - 1
                raise PayloadTooLarge(
                    f"The file in field {upload.field!r} is larger than "
                    f"{self._max_file_bytes} bytes.",
                    param=_file_param(upload.field, position),
                    code="file_too_large",
                )
            # A view, not a copy: the received chunk is kept alive instead of duplicated.
            whole = start == 0 and end == len(data)
            upload.write(data if whole else memoryview(data)[start:end])
        elif self._text is not None:
            if len(self._text) + (end - start) > self._limits.max_field_bytes:
                raise PayloadTooLarge(
                    f"The field {self._text_name!r} is longer than "
                    f"{int(self._limits.max_field_bytes)} bytes.",
                    param=self._text_name,
                    code="field_too_large",
                )
            self._text += data[start:end]

    def _part_end(self) -> None:
        if self._text is not None:
            try:
                value = self._text.decode("utf-8")
            except UnicodeDecodeError:
                raise InvalidRequest(
                    f"The field {self._text_name!r} is not valid UTF-8.",
                    param=self._text_name,
                    code="invalid_encoding",
                ) from None
            self.form.fields.append(TextField(self._text_name, value))
        self._text = None
        self._upload = None

    def _end(self) -> None:
        self.finished = True


def _file_param(field_name: str, position: int) -> str:
    base = field_name.split("[", 1)[0]
    return f"{base}[{position}]" if field_name.endswith("]") else base


def _decode_header(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"A multipart {what} is not valid UTF-8.", code="invalid_multipart"
        ) from None


async def read_form(
    chunks: AsyncIterator[bytes],
    *,
    content_type: str | None,
    content_length: str | None,
    limits: Limits,
    max_file_bytes: int,
    worker: SpoolWorker | None = None,
    hash_uploads: bool = True,
) -> IntakeForm:
    """Parse a multipart body from `chunks`, refusing it with 413 the moment a limit is crossed.

    With a `worker`, uploads are hashed and spooled on its thread; the form is returned only once
    all of that is done, so its files are complete and their digests ready. `hash_uploads`
    False: nothing will want the digests (no cache lookup), so none is computed on arrival."""
    boundary = multipart_boundary(content_type)
    max_body = int(limits.max_body_bytes)
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise InvalidRequest("Content-Length is not a number.") from None
        if declared > max_body:
            raise PayloadTooLarge(
                f"The request body is {declared} bytes; the limit is {max_body}.",
                code="body_too_large",
            )

    builder = _FormBuilder(limits, max_file_bytes, worker, hash_uploads)
    parser = MultipartParser(
        boundary,
        builder.callbacks(),  # type: ignore[arg-type]
        max_header_size=int(limits.max_part_header_bytes),
    )
    received = 0
    paced = paced_body(chunks, idle=limits.body_idle_timeout, total=limits.body_timeout)
    try:
        async for chunk in paced:
            received += len(chunk)
            if received > max_body:
                raise PayloadTooLarge(
                    f"The request body is larger than {max_body} bytes.", code="body_too_large"
                )
            _feed(parser, chunk)
            files = builder.form.files
            if files and files[-1].backlog_bytes > MAX_SPOOL_BACKLOG_BYTES:
                await files[-1].settled()
        _feed(parser, None)
        if not builder.finished:
            raise InvalidRequest(
                "The multipart body ended before its closing boundary.", code="invalid_multipart"
            )
        for upload in builder.form.files:
            await upload.settled()
    except RequestTimeout:
        builder.form.close()
        raise
    except GatewayError as exc:
        builder.form.close()
        if not await _drain(chunks, max_body):
            # Unread body bytes would be parsed as the next request on this connection.
            raise exc.with_headers({"connection": "close"}) from None
        raise
    except BaseException:
        builder.form.close()
        raise
    finally:
        await paced.aclose()
    builder.form.body_bytes = received
    return builder.form


async def paced_body(
    chunks: AsyncIterator[bytes], *, idle: float, total: float
) -> AsyncGenerator[bytes, None]:
    """`chunks`, or 408 when the client pauses longer than `idle` or takes longer than `total`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + total
    iterator = aiter(chunks)
    while True:
        wait = min(idle, deadline - loop.time())
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                chunk = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimeout(
                f"The request body stopped arriving (no data for {idle:g} seconds, or more than "
                f"{total:g} seconds in all); the connection is closed.",
                headers={"connection": "close"},
            ) from None
        yield chunk


def _feed(parser: MultipartParser, chunk: bytes | None) -> None:
    try:
        if chunk is None:
            parser.finalize()
        else:
            parser.write(chunk)
    except MultipartParseError as exc:
        raise InvalidRequest(
            f"The multipart body is malformed: {exc}.", code="invalid_multipart"
        ) from None


async def _drain(chunks: AsyncIterator[bytes], budget: int) -> bool:
    """Read and discard what is left of the body, bounded in bytes and time; True if it all was."""
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            async for chunk in chunks:
                budget -= len(chunk)
                if budget < 0:
                    return False
    except Exception:
        # A timeout, a disconnect, or a stream already closed: the rest is not coming.
        return False
    return True
