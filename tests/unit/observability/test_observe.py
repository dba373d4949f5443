"""ObservabilityMiddleware on its own: a request that ends with nobody answered (its client left,
or the server cancelled it at shutdown) is logged and counted as 499, never as a 500."""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.types import Message, Receive, Scope, Send

from app.observability.access_log import ObservabilityMiddleware
from app.observability.logs import FIELDS
from app.observability.metrics import GatewayMetrics
from tests.support.prom import total

SCOPE: Scope = {"type": "http", "method": "POST", "path": "/v1/images/edits", "headers": []}


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.fields: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.fields.append(getattr(record, FIELDS))


def observed(app: object) -> tuple[ObservabilityMiddleware, GatewayMetrics, Lines]:
    metrics = GatewayMetrics(models=())
    logger = logging.getLogger("test.observe.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    lines = Lines()
    logger.handlers = [lines]
    middleware = ObservabilityMiddleware(app, metrics=metrics, logger=logger)  # type: ignore[arg-type]
    return middleware, metrics, lines


async def disconnected() -> Message:
    return {"type": "http.disconnect"}


async def nowhere(message: Message) -> None:
    raise AssertionError(f"nothing may be sent: {message}")


def counted(metrics: GatewayMetrics, status_class: str) -> float:
    return total(metrics.scrape().decode(), "gateway_requests_total", status_class=status_class)


def in_flight(metrics: GatewayMetrics) -> float:
    return total(metrics.scrape().decode(), "gateway_requests_in_flight")


def test_observe_request_whose_client_left_unanswered_is_a_499() -> None:
    async def waits_then_sees_the_client_gone(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "http.disconnect"

    middleware, metrics, lines = observed(waits_then_sees_the_client_gone)
    asyncio.run(middleware(dict(SCOPE), disconnected, nowhere))
    assert [line["status"] for line in lines.fields] == [499]
    assert counted(metrics, "4xx") == 1 and counted(metrics, "5xx") == 0
    assert in_flight(metrics) == 0


def test_observe_request_cancelled_before_answering_is_a_499_and_stays_cancelled() -> None:
    async def cancelled(scope: Scope, receive: Receive, send: Send) -> None:
        raise asyncio.CancelledError

    middleware, metrics, lines = observed(cancelled)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(middleware(dict(SCOPE), disconnected, nowhere))
    assert [line["status"] for line in lines.fields] == [499]
    assert counted(metrics, "5xx") == 0
    assert in_flight(metrics) == 0


def test_observe_app_failing_without_an_answer_is_still_a_500() -> None:
    async def broken(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("bug")

    middleware, metrics, lines = observed(broken)
    with pytest.raises(RuntimeError):
        asyncio.run(middleware(dict(SCOPE), disconnected, nowhere))
    assert [line["status"] for line in lines.fields] == [500]
    assert counted(metrics, "5xx") == 1
