"""Re-emit a validated edit as a multipart body, streamed straight from the spooled uploads.

The body is described once (text preambles plus references to the uploads) and can be streamed
any number of times, so a retry never re-reads the client. Content-Length is known up front.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import cast

from app.intake.request import EditRequest, ImageInput, ParamValue
from app.intake.spool import SpooledUpload

# Spooled files are read back in pieces of this size.
READ_BYTES = 1024 * 1024


def _quote(name: str) -> str:
    # The HTML form-encoding rule for names in Content-Disposition: escape ", CR and LF.
    return name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _text(value: ParamValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class MultipartBody:
    def __init__(self, fields: list[tuple[str, str]], files: list[tuple[str, ImageInput]]) -> None:
        self.boundary = "gw-" + secrets.token_hex(16)
        dash = b"--" + self.boundary.encode()
        self._segments: list[bytes | SpooledUpload] = []
        for name, value in fields:
            self._segments.append(
                dash
                + b'\r\nContent-Disposition: form-data; name="'
                + _quote(name).encode()
                + b'"\r\n\r\n'
                + value.encode()
                + b"\r\n"
            )
        for position, (name, image) in enumerate(files):
            # Never the client's filename: it may carry paths or personal data.
            filename = f"{name.split('[', 1)[0]}-{position}.{image.info.kind}"
            self._segments.append(
                dash
                + b'\r\nContent-Disposition: form-data; name="'
                + name.encode()
                + b'"; filename="'
                + filename.encode()
                + b'"\r\nContent-Type: '
                + image.info.mime_type.encode()
                + b"\r\n\r\n"
            )
            self._segments.append(image.upload)
            self._segments.append(b"\r\n")
        self._segments.append(dash + b"--\r\n")
        self.length = sum(
            segment.size if isinstance(segment, SpooledUpload) else len(segment)
            for segment in self._segments
        )

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    async def stream(self) -> AsyncIterator[bytes]:
        # The pieces go out as they are (the uploads as the views of the chunks that arrived):
        # how they are batched into writes is the transport's business
        # (app/upstream/aiohttp_transport.py joins the small ones).
        for piece in self._pieces():
            yield cast(bytes, piece)

    def _pieces(self) -> Iterator[bytes | memoryview]:
        for segment in self._segments:
            if isinstance(segment, SpooledUpload):
                yield from segment.iter_chunks(READ_BYTES)
            else:
                yield segment


def openai_edit_body(edit: EditRequest) -> MultipartBody:
    """The OpenAI dialect: one file as `image`, several as `image[]`, then `mask` and `markup`;
    ints and bools as text."""
    fields = [("model", edit.model.upstream_model), ("prompt", edit.prompt)]
    fields += [(name, _text(value)) for name, value in edit.params.items()]
    fields += list(edit.extra_fields)
    image_field = "image" if len(edit.images) == 1 else "image[]"
    files = [(image_field, image) for image in edit.images]
    if edit.mask is not None:
        files.append(("mask", edit.mask))
    if edit.markup is not None:
        files.append(("markup", edit.markup))
    return MultipartBody(fields, files)
