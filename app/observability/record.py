"""What one request did, noted by the layers it passes through, for its log line and metrics.

The observability middleware opens a record per request and keeps it in the ASGI scope's
`state` (Starlette's `request.state`); the layers that know something about the request are
handed the record, or a callback that notes into it (the route passes `note_attempt` down to
the forwarder), so none of them needs to know how the request is logged or counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Scope

_STATE_KEY = "request_record"


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


def open_record(scope: Scope) -> RequestRecord:
    """A fresh record for the request `scope` belongs to, kept in its state."""
    state = scope.setdefault("state", {})
    record = RequestRecord(request_id=state.get("request_id", ""))
    state[_STATE_KEY] = record
    return record


def record_in(scope: Scope) -> RequestRecord:
    """The request's record; a throwaway one for a request nobody opened a record for."""
    record = scope.get("state", {}).get(_STATE_KEY)
    return record if isinstance(record, RequestRecord) else RequestRecord()
