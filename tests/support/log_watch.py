"""Issue 6, acceptance 2: the logs of a whole test run hold no traceback caused by client input.

Every log record carrying exception info (the gateway's own, uvicorn's "Exception in ASGI
application", asyncio's "Task exception was never retrieved"), from any thread, is collected; a
test during which one was logged fails, unless it is marked `server_error_expected` (a test that
breaks the gateway on purpose, not through client input).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

# uvicorn configures its loggers with propagate=False and replaces their handlers whenever a
# server starts, so its error logger gets a filter (filters survive) and the root a handler.
_UVICORN_ERROR = "uvicorn.error"
# Test doubles that fail on purpose (the fake upstream dropping a connection) log tracebacks of
# their own; they come from the double's server, not from the gateway.
DELIBERATE = ("fake upstream drops the connection",)


class TracebackCollector(logging.Handler, logging.Filter):
    def __init__(self) -> None:
        logging.Handler.__init__(self, level=logging.DEBUG)
        logging.Filter.__init__(self)
        # Formatted text only: a kept record would keep its traceback's frames (and every
        # upload they reference) alive for the rest of the run.
        self.records: list[str] = []
        self.scanned = 0
        # Tracebacks logged during tests marked `server_error_expected` (on purpose).
        self.expected = 0
        self._formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        self.scanned += 1
        if record.exc_info or "Traceback (most recent call last)" in record.getMessage():
            text = self._formatter.format(record)
            if any(marker in text for marker in DELIBERATE):
                return
            with self._lock_records:
                self.records.append(text)

    def filter(self, record: logging.LogRecord) -> bool:
        self.emit(record)
        return True

    @staticmethod
    def describe(records: list[str]) -> str:
        return "\n\n".join(records)


COLLECTOR = TracebackCollector()


def install() -> None:
    root = logging.getLogger()
    if COLLECTOR not in root.handlers:
        root.addHandler(COLLECTOR)
    uvicorn_error = logging.getLogger(_UVICORN_ERROR)
    if COLLECTOR not in uvicorn_error.filters:
        uvicorn_error.addFilter(COLLECTOR)


@pytest.fixture(autouse=True)
def no_traceback_from_client_input(request: pytest.FixtureRequest) -> Iterator[None]:
    install()
    start = len(COLLECTOR.records)
    yield
    logged = COLLECTOR.records[start:]
    if logged and request.node.get_closest_marker("server_error_expected") is not None:
        COLLECTOR.expected += len(logged)
    elif logged:
        pytest.fail(
            f"{len(logged)} traceback(s) logged during this test:\n{COLLECTOR.describe(logged)}",
            pytrace=False,
        )


# Under pytest-xdist the tests run in worker processes, each with its own collector; a worker
# hands its counts (scanned, tracebacks, expected) to the controller, which sums them.
_WORKER_COUNTS: list[tuple[int, int, int]] = []


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["log_watch"] = (COLLECTOR.scanned, len(COLLECTOR.records), COLLECTOR.expected)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    counts = getattr(node, "workeroutput", {}).get("log_watch")
    if counts is not None:
        _WORKER_COUNTS.append(tuple(counts))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    scanned, tracebacks, expected = (
        sum(column)
        for column in zip(
            (COLLECTOR.scanned, len(COLLECTOR.records), COLLECTOR.expected),
            *_WORKER_COUNTS,
            strict=True,
        )
    )
    terminalreporter.write_line(
        f"log watch: {scanned} log records scanned, {tracebacks - expected} traceback(s) from "
        f"client input or unexpected failures, {expected} from tests that break the "
        "gateway on purpose"
    )
