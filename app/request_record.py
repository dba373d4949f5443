"""What one request did, noted by the layers it passes through, for its log line and metrics.

The observability middleware opens a record per request; the route, the forwarder and the cache
fill in what only they know (model, upstream, key id, attempts, cache result) through
`current_record()`, so none of them needs to know how the request is logged or counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


@dataclass(slots=True)
class RequestRecord:
    request_id: str = ""
    client_request_id: str | None = (
        None  # the x-request-id the response carried, if the route set one
    )
    model: str | None = None  # a catalog name, once validation has found the model
    prompt_chars: int | None = None
    prompt: str | None = None  # only when logging.log_prompts is on
    images_in: int = 0
    upload_bytes: int = 0
    images_out: int = 0
    upstream: str | None = None
    key_id: str | None = None
    attempts: int = 0
    cache: str | None = None  # hit | miss | bypass
    # Set when the request ended in a GatewayError.
    error_code: str | None = None
    error_param: str | None = None
    failure: str | None = None  # the upstream failure kind, None for the gateway's own errors

    def note_attempt(self, upstream: str, key_id: str | None) -> None:
        self.upstream = upstream
        self.key_id = key_id
        self.attempts += 1

    def note_error(self, *, code: str | None, param: str | None, failure: str | None) -> None:
        self.error_code = code
        self.error_param = param
        self.failure = failure


_current: ContextVar[RequestRecord | None] = ContextVar("request_record", default=None)


def current_record() -> RequestRecord:
    """The record of the request being handled; a throwaway one outside any request."""
    record = _current.get()
    return record if record is not None else RequestRecord()


@contextmanager
def recording(request_id: str) -> Iterator[RequestRecord]:
    """Make a fresh record current for the duration of one request."""
    record = RequestRecord(request_id=request_id)
    token = _current.set(record)
    try:
        yield record
    finally:
        _current.reset(token)
