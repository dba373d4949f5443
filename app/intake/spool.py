"""One uploaded file as it streams in: hashed on arrival, kept in memory up to a threshold, then in
an anonymous temp file, and replayable any number of times towards the upstream.

Bytes are stored as the parser hands them over (views into the received chunks), so an upload is
held once in memory and never joined into one big copy on the request path.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import AsyncIterator, Iterator

Chunk = bytes | memoryview

# Reads from the spool file happen on the event loop: they hit the page cache (the file was just
# written) and a 256 KiB pread costs tens of microseconds, far less than a thread hop.
READ_CHUNK_BYTES = 256 * 1024


class SpooledUpload:
    def __init__(self, field: str, filename: str | None, *, threshold: int, spool_dir: str | None):
        self.field = field
        self.filename = filename
        self.size = 0
        self._threshold = threshold
        self._spool_dir = spool_dir
        self._hash = hashlib.sha256()
        self._digest: str | None = None
        self._chunks: list[Chunk] = []
        self._fd: int | None = None

    def write(self, chunk: Chunk) -> None:
        self._hash.update(chunk)
        self.size += len(chunk)
        if self._fd is None and self.size > self._threshold:
            self._move_to_disk()
        if self._fd is None:
            self._chunks.append(chunk)
        else:
            _write_all(self._fd, chunk)

    def _move_to_disk(self) -> None:
        # An unnamed temp file (O_TMPFILE where available) vanishes with its descriptor, so a
        # crash or a cancelled request can never leave upload bytes behind on disk.
        spooled = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115 - we own the fd
        self._fd = os.dup(spooled.fileno())
        spooled.close()
        for chunk in self._chunks:
            _write_all(self._fd, chunk)
        self._chunks = []

    @property
    def sha256(self) -> str:
        if self._digest is None:
            self._digest = self._hash.hexdigest()
        return self._digest

    @property
    def on_disk(self) -> bool:
        return self._fd is not None

    def head(self, limit: int) -> bytes:
        """The first `limit` bytes (or fewer if the file is shorter)."""
        return self._read_range(0, min(limit, self.size))

    def tail(self, limit: int) -> bytes:
        start = max(0, self.size - limit)
        return self._read_range(start, self.size - start)

    def read_all(self) -> bytes:
        return self._read_range(0, self.size)

    def iter_chunks(self, read_bytes: int = READ_CHUNK_BYTES) -> Iterator[Chunk]:
        """The bytes in order: the chunks as received, or reads of `read_bytes` from disk."""
        if self._fd is None:
            yield from self._chunks
            return
        offset = 0
        while offset < self.size:
            data = os.pread(self._fd, min(read_bytes, self.size - offset), offset)
            if not data:
                raise OSError("spool file shrank while it was being read")
            offset += len(data)
            yield data

    async def aiter_chunks(self) -> AsyncIterator[Chunk]:
        for chunk in self.iter_chunks():
            yield chunk

    def _read_range(self, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if self._fd is not None:
            return os.pread(self._fd, length, start)
        out = bytearray()
        position = 0
        for chunk in self._chunks:
            end = position + len(chunk)
            if end > start:
                lo = max(0, start - position)
                hi = min(len(chunk), start + length - position)
                out += chunk[lo:hi]
                if len(out) >= length:
                    break
            position = end
        return bytes(out)

    def close(self) -> None:
        self._chunks = []
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _write_all(fd: int, chunk: Chunk) -> None:
    view = memoryview(chunk)
    while view:
        written = os.write(fd, view)
        view = view[written:]
