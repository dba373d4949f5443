"""Intake with a SpoolWorker: hashes and temp-file writes happen on the worker's thread, and the
form comes back complete: right digests, right bytes, files on disk above the threshold, and no
descriptor left open once it is closed."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Callable

import pytest
from pydantic import ByteSize

from app.config.settings import Limits
from app.errors import PayloadTooLarge
from app.intake.form import IntakeForm, read_form
from app.intake.spool import SpoolWorker
from tests.support import images

BOUNDARY = "test-boundary-1234"


def _body(files: list[tuple[str, bytes]], prompt: str = "x") -> bytes:
    dash = f"--{BOUNDARY}".encode()
    parts = [dash + b'\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n' + prompt.encode()]
    for name, data in files:
        parts.append(
            dash
            + f'\r\nContent-Disposition: form-data; name="{name}"; filename="f.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
        )
    return b"\r\n".join(parts) + b"\r\n" + dash + b"--\r\n"


async def _chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]
        await asyncio.sleep(0)


def _read(
    body: bytes,
    worker: SpoolWorker | None,
    chunk: int = 64 * 1024,
    max_file_bytes: int = 50 * 1024 * 1024,
    hash_uploads: bool = True,
) -> IntakeForm:
    limits = Limits(spool_threshold_bytes=ByteSize(1024 * 1024))

    async def go() -> IntakeForm:
        return await read_form(
            _chunks(body, chunk),
            content_type=f"multipart/form-data; boundary={BOUNDARY}",
            content_length=str(len(body)),
            limits=limits,
            max_file_bytes=max_file_bytes,
            worker=worker,
            hash_uploads=hash_uploads,
        )

    return asyncio.run(go())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_spool_worker_hashes_and_spools_uploads_intact() -> None:
    big = images.noise_png(1100, 1100, seed=3)  # ~3.6 MB: spooled to disk
    small = images.png(32, 32)  # stays in memory, below the offload size: hashed inline
    body = _body([("image[]", big), ("image[]", small), ("image[]", big[: 200 * 1024])])
    worker = SpoolWorker()
    fds_before = _open_fds()
    try:
        form = _read(body, worker)
        first, second, third = form.files
        spooled = _open_fds() - fds_before  # each upload spooled to disk holds a descriptor
        assert first.sha256 == hashlib.sha256(big).hexdigest()
        assert second.sha256 == hashlib.sha256(small).hexdigest()
        assert third.sha256 == hashlib.sha256(big[: 200 * 1024]).hexdigest()
        assert b"".join(first.iter_chunks(300_000)) == big
        assert first.head(16) == big[:16] and first.tail(16) == big[-16:]
        assert b"".join(bytes(chunk) for chunk in third.iter_chunks()) == big[: 200 * 1024]
        first.close()
        # One upload went to disk, and it was the first (the large one): the others stay in memory.
        assert (spooled, _open_fds()) == (1, fds_before)
        form.close()
    finally:
        worker.shutdown()
    assert _open_fds() == fds_before


def test_spool_worker_matches_inline_intake() -> None:
    big = images.noise_png(900, 900, seed=4)
    body = _body([("image", big)])
    worker = SpoolWorker()
    try:
        for chunk in (1000, 64 * 1024, 1024 * 1024):
            with_worker = _read(body, worker, chunk)
            inline = _read(body, None, chunk)
            assert with_worker.files[0].sha256 == inline.files[0].sha256
            assert with_worker.files[0].read_all() == inline.files[0].read_all() == big
            with_worker.close()
            inline.close()
    finally:
        worker.shutdown()


def test_spool_worker_refused_upload_leaves_no_descriptor() -> None:
    # A 413 mid-upload closes the form while writes may still be queued on the worker: the
    # descriptor must be closed after them, never leaked and never closed early.
    big = images.noise_png(1300, 1300, seed=5)  # ~5 MB
    body = _body([("image", big)])
    worker = SpoolWorker()
    fds_before = _open_fds()
    try:
        for _ in range(5):
            with pytest.raises(PayloadTooLarge):
                _read(body, worker, 512 * 1024, max_file_bytes=4 * 1024 * 1024)
    finally:
        worker.shutdown()
    assert _open_fds() == fds_before


def test_spool_worker_survives_a_failing_job() -> None:
    worker = SpoolWorker()
    ran: list[str] = []

    def fails() -> None:
        raise OSError("bad descriptor")

    try:
        worker.submit(fails)
        form = _read(_body([("image", images.noise_png(300, 300, seed=6))]), worker)
        worker.submit(lambda: ran.append("after"))
        assert form.files[0].read_all().startswith(b"\x89PNG")
        form.close()
    finally:
        worker.shutdown()
    assert ran == ["after"]


class CountingWorker(SpoolWorker):
    def __init__(self) -> None:
        super().__init__()
        self.jobs = 0

    def submit(self, job: Callable[[], object]) -> None:
        self.jobs += 1
        super().submit(job)


def test_uploads_nothing_will_look_up_are_not_hashed_on_arrival() -> None:
    # With the cache off (or `no-store`) no digest is wanted: in-memory uploads give the worker
    # nothing to do, spooled ones only their writes; a digest asked for anyway is still right.
    small, big = images.noise_png(500, 500, seed=11), images.noise_png(1100, 1100, seed=12)
    for upload_bytes, hashed_jobs_at_least in ((small, 1), (big, 2)):
        worker, eager_worker = CountingWorker(), CountingWorker()
        try:
            fds_before = _open_fds()
            lazy = _read(_body([("image", upload_bytes)]), worker, hash_uploads=False)
            spooled = _open_fds() > fds_before
            eager = _read(_body([("image", upload_bytes)]), eager_worker)
            if not spooled:
                assert worker.jobs == 0
            assert eager_worker.jobs >= hashed_jobs_at_least
            expected = hashlib.sha256(upload_bytes).hexdigest()
            assert lazy.files[0].sha256 == eager.files[0].sha256 == expected
            assert lazy.files[0].read_all() == upload_bytes
            lazy.close()
            eager.close()
        finally:
            worker.shutdown()
            eager_worker.shutdown()
