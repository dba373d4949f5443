"""A deliberately permissive multipart encoder: it writes whatever it is told, valid or not, so
tests can build the bodies a hostile client would send."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

BOUNDARY = "hardening-7d3c0a5e"


@dataclass(frozen=True)
class Part:
    name: bytes | None
    data: bytes
    filename: bytes | None = None
    content_type: bytes | None = None
    extra_headers: tuple[bytes, ...] = field(default_factory=tuple)

    def encode(self) -> bytes:
        disposition = b"Content-Disposition: form-data"
        if self.name is not None:
            disposition += b'; name="' + self.name + b'"'
        if self.filename is not None:
            disposition += b'; filename="' + self.filename + b'"'
        lines = [disposition]
        if self.content_type is not None:
            lines.append(b"Content-Type: " + self.content_type)
        lines.extend(self.extra_headers)
        return b"\r\n".join(lines) + b"\r\n\r\n" + self.data


def text(name: str, value: str | bytes) -> Part:
    return Part(name.encode(), value.encode() if isinstance(value, str) else value)


def file(
    name: str, data: bytes, filename: str = "image.png", content_type: str = "image/png"
) -> Part:
    return Part(name.encode(), data, filename.encode(), content_type.encode())


def encode(parts: Iterable[Part], boundary: str = BOUNDARY) -> bytes:
    dash = b"--" + boundary.encode()
    out = bytearray()
    for part in parts:
        out += dash + b"\r\n" + part.encode() + b"\r\n"
    out += dash + b"--\r\n"
    return bytes(out)


def content_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"
