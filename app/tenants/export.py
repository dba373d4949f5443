"""The usage export for billing systems (`GET /admin/usage/export`): one row per client, UTC day
and model with every counter of Usage, as CSV (a header row) or JSON lines. The columns are
derived from Usage, so a counter added there is exported with no change here."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Final

import orjson

from app.tenants.usage import SHOWN_COUNTERS, UsageRow, usd_text

# format -> (media type, file extension)
EXPORT_FORMATS: Final = {
    "csv": ("text/csv; charset=utf-8", "csv"),
    "jsonl": ("application/x-ndjson", "jsonl"),
}
COLUMNS: Final = ("client", "date", "model", *SHOWN_COUNTERS)


def export_csv(rows: Iterable[UsageRow]) -> bytes:
    """RFC 4180 CSV; money as exact decimals (`0.040000000`), never a float's `4e-02`."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row.shown(usd=usd_text))
    return out.getvalue().encode()


def export_jsonl(rows: Iterable[UsageRow]) -> bytes:
    """One JSON object per line, as /admin/usage shows a row (money in USD as numbers)."""
    return b"".join(orjson.dumps(row.shown()) + b"\n" for row in rows)
