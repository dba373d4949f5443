"""One uploaded file as it streams in: hashed on arrival, kept in memory up to a threshold, then in
an anonymous temp file, and replayable any number of times towards the upstream.

Bytes are stored as the parser hands them over (views into the received chunks), so an upload is
held once in memory and never joined into one big copy on the request path. Given a SpoolWorker,
hashing and temp-file writes run on its thread, overlapping the parse on the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator
from functools import partial

Chunk = bytes | memoryview
log = logging.getLogger("gateway.spool")

# Reads from the spool file happen on the event loop: they hit the page cache (the file was just
# written) and a 256 KiB pread costs tens of microseconds, far less than a thread hop.
READ_CHUNK_BYTES = 256 * 1024
# Smaller chunks are hashed inline: below this a thread hand-off costs more than the hash.
OFFLOAD_MIN_BYTES = 16 * 1024


class SpoolWorker:
    """One thread that hashes upload bytes and writes them to spool files, in submission order.

    hashlib and os.write release the GIL, so SHA-256 (about 0.6 ms per MB here) and disk writes
    run on another core while the event loop parses the next chunk. One thread keeps every
    upload's hash updates and writes in arrival order without locks; a bare SimpleQueue, because
    an executor's futures and locks cost more per chunk than the hand-off saves.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], object] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], object]) -> None:
        """Run `job` after every job submitted before it."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="spool", daemon=True)
            self._thread.start()
        self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                job()
            except Exception as exc:
                # Upload jobs record their own errors; anything else (a close that failed, a
                # loop already closed at shutdown) must not end the thread every upload needs.
                log.error("spool worker job failed (%s)", type(exc).__name__)
            # Idle with no reference left: the last job must not keep its upload alive.
            del job

    def shutdown(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None


class SpooledUpload:
    def __init__(
        self,
        field: str,
        filename: str | None,
        *,
        threshold: int,
        spool_dir: str | None,
        worker: SpoolWorker | None = None,
        hash_on_arrival: bool = True,
    ):
        self.field = field
        self.filename = filename
        self.size = 0
        self._threshold = threshold
        self._spool_dir = spool_dir
        # Hashed as the bytes arrive when the cache will want the digest; otherwise only if
        # someone asks for it (from the stored bytes), and never on the request path.
        self._hash = hashlib.sha256() if hash_on_arrival else None
        self._digest: str | None = None
        self._chunks: list[Chunk] = []
        self._fd: int | None = None
        self._worker = worker
        # Jobs handed to the worker, and how many it finished (written by the worker only).
        self._jobs_submitted = 0
        self._jobs_done = 0
        self._job_error: BaseException | None = None
        # Bytes handed to the worker since the last settled(): intake waits when this grows, so
        # a client faster than the disk cannot pile its upload up in memory.
        self.backlog_bytes = 0

    def write(self, chunk: Chunk) -> None:
        self.size += len(chunk)
        if self._fd is None and self.size > self._threshold:
            self._move_to_disk()
        digest = self._hash
        if self._fd is None:
            self._chunks.append(chunk)
            if digest is not None:
                self._run(lambda: digest.update(chunk), len(chunk))
        else:
            fd = self._fd

            def hash_and_write() -> None:
                if digest is not None:
                    digest.update(chunk)
                _write_all(fd, chunk)

            self._run(hash_and_write, len(chunk))

    def _run(self, work: Callable[[], None], size: int) -> None:
        # Once anything went to the worker, everything does, so the order holds.
        if self._worker is not None and (self._jobs_submitted or size >= OFFLOAD_MIN_BYTES):
            self._jobs_submitted += 1
            self.backlog_bytes += size
            self._worker.submit(partial(self._job, work))
        else:
            work()

    def _job(self, work: Callable[[], None]) -> None:
        """Runs on the worker thread."""
        try:
            work()
        except BaseException as exc:
            self._job_error = self._job_error or exc
        self._jobs_done += 1

    def _move_to_disk(self) -> None:
        # An unnamed temp file (O_TMPFILE where available) vanishes with its descriptor, so a
        # crash or a cancelled request can never leave upload bytes behind on disk.
        spooled = tempfile.TemporaryFile(dir=self._spool_dir)  # noqa: SIM115 - we own the fd
        fd = self._fd = os.dup(spooled.fileno())
        spooled.close()
        chunks, self._chunks = self._chunks, []

        def write_held() -> None:
            for chunk in chunks:
                _write_all(fd, chunk)

        self._run(write_held, sum(len(chunk) for chunk in chunks))

    async def settled(self) -> None:
        """Wait until every byte written so far is hashed and, if spooled to disk, on disk.

        Raises what the worker hit (a full disk, say)."""
        if self._worker is not None and self._jobs_done < self._jobs_submitted:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[None] = loop.create_future()
            # Queued behind this upload's jobs, so it runs once they all have.
            self._worker.submit(lambda: loop.call_soon_threadsafe(_resolve, done))
            await done
        self.backlog_bytes = 0
        if self._job_error is not None:
            raise self._job_error

    @property
    def sha256(self) -> str:
        if self._digest is None:
            if self._worker is not None and self._jobs_done < self._jobs_submitted:
                # Not reached on the request path: intake awaits settled() first.
                finished = threading.Event()
                self._worker.submit(finished.set)
                finished.wait()
            digest = self._hash
            if digest is None:
                digest = hashlib.sha256()
                for chunk in self.iter_chunks():
                    digest.update(chunk)
            self._digest = digest.hexdigest()
        return self._digest

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
                out += memoryview(chunk)[lo:hi]
                if len(out) >= length:
                    break
            position = end
        return bytes(out)

    def close(self) -> None:
        self._chunks = []
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self._worker is not None and self._jobs_done < self._jobs_submitted:
                # Writes are still queued for this descriptor: close it after them, never
                # before (a reused descriptor number would receive the rest of the upload).
                self._worker.submit(lambda: os.close(fd))
            else:
                os.close(fd)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # the request may have been cancelled meanwhile
        future.set_result(None)


def _write_all(fd: int, chunk: Chunk) -> None:
    view = memoryview(chunk)
    while view:
        written = os.write(fd, view)
        view = view[written:]
