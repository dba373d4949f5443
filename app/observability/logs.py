"""Log output: one JSON object per line (or plain text for a terminal), secrets scrubbed.

The CLI hands `logging_config()` to uvicorn so every worker process logs the same way, with
uvicorn's own access log switched off: the gateway writes one richer line per request itself
(app/observability/access_log.py). The lifespan adds a filter that scrubs the configured secrets
from every record, on top of the formatters' own scrubbing of anything shaped like an API key.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from app.config.settings import LoggingConfig
from app.observability.redaction import Redactor

ACCESS_LOGGER = "gateway.access"
# Records carry their structured fields under this attribute (`extra={"fields": {...}}`).
FIELDS = "fields"

_key_shapes = Redactor(())


def _timestamp(created: float) -> str:
    return datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")


def _exception_text(record: logging.LogRecord, formatter: logging.Formatter) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            line.update(fields)
        exception = _exception_text(record, self)
        if exception:
            line["exc"] = exception
        return _key_shapes(orjson.dumps(line, default=str).decode())


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
        return _key_shapes(text)


def logging_config(config: LoggingConfig) -> dict[str, Any]:
    """A logging.config.dictConfig dict for uvicorn's `log_config` (applied in each worker)."""
    level = config.level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "json": {"()": f"{__name__}.JsonFormatter"},
            "text": {"()": f"{__name__}.TextFormatter"},
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": config.format,
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            # uvicorn's loggers write through the root handler, in the same format.
            "uvicorn": {"handlers": [], "propagate": True, "level": level},
            "uvicorn.error": {"handlers": [], "propagate": True, "level": level},
            # Replaced by the gateway's own line per request.
            "uvicorn.access": {"handlers": [], "propagate": False, "level": "WARNING"},
            # httpx logs every upstream call at INFO, URL included; the access line covers it.
            "httpx": {"level": "WARNING"},
            # aiohttp's client logs little, but at debug it can name hosts and connections.
            "aiohttp": {"level": "WARNING"},
        },
    }


class RedactingFilter(logging.Filter):
    """Replace configured secrets in a record's message, exception text and fields."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self._redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._redact(record.getMessage())
        record.args = None
        exception = _exception_text(record, logging.Formatter())
        if exception:
            record.exc_text = self._redact(exception)
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                if isinstance(value, str):
                    fields[name] = self._redact(value)
        return True


def install_redaction(redact: Callable[[str], str]) -> Callable[[], None]:
    """Scrub secrets on every handler of the root logger; returns the undo."""
    handlers = list(logging.getLogger().handlers)
    scrubber = RedactingFilter(redact)
    for handler in handlers:
        handler.addFilter(scrubber)

    def uninstall() -> None:
        for handler in handlers:
            handler.removeFilter(scrubber)

    return uninstall
