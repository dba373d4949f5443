"""Usage accounting per client, model and UTC day, in Redis, and the report `/admin/usage` shows.

Redis layout: one hash per client and day, under the client's hash tag (Redis Cluster friendly):
  <ns>:{client:<name>}:usage:<YYYYMMDD>   field "<model>|<counter>" -> integer
Costs are kept as integer nano-dollars so sums stay exact; the report turns them into USD.
When Redis is unreachable the increments are kept in this process (bounded) and written with the
next record that succeeds, so the report catches up after an outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis

from app.config.catalog import ModelPrice
from app.errors import StoreUnavailable
from app.shared_state.failures import store_errors

log = logging.getLogger("gateway.clients")

USAGE_TTL_SECONDS = 400 * 86400
MAX_REPORT_DAYS = 366
# Increments held while Redis is down, at most; beyond it new ones are dropped (and counted).
MAX_PENDING = 100_000
NANOS_PER_USD = Decimal(1_000_000_000)
# Money counters end so; reports show them in USD under the name without it (cost_usd).
_NANO_USD = "_nano_usd"


@dataclass(frozen=True, slots=True)
class Usage:
    """What one request used; every field adds up in the report."""

    requests: int = 0  # edits answered (from the upstream or the cache)
    images: int = 0  # images generated upstream (billed)
    errors: int = 0  # edits that reached an upstream and failed
    cache_hits: int = 0  # edits answered from the cache
    cached_images: int = 0  # images served from the cache
    upstream_calls_saved: int = 0  # upstream calls the cache hits made unnecessary
    input_bytes: int = 0  # uploaded image, mask and markup bytes
    input_tokens: int = 0  # from the upstream's `usage`
    output_tokens: int = 0
    total_tokens: int = 0
    cost_nano_usd: int = 0  # estimated upstream spend
    saved_input_tokens: int = 0  # tokens the cache hits would have cost upstream
    saved_output_tokens: int = 0
    saved_nano_usd: int = 0  # estimated spend the cache avoided


COUNTERS = tuple(f.name for f in fields(Usage))


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """The token counts of one answer's `usage`; input split by kind when the answer says so."""

    input_tokens: int = 0
    output_tokens: int = 0
    total_tokens: int = 0
    text_input_tokens: int = 0
    image_input_tokens: int = 0
    cached_input_tokens: int = 0


def estimate_cost_nanos(price: ModelPrice, images: int, tokens: TokenUsage) -> int:
    """The one place an answer's cost is computed, in integer nano-dollars.

    Cached tokens are a share of the input that OpenAI reports as one number: they are taken
    from the image tokens first (an edit's repeated reference images are what a cache holds;
    text is a few dozen tokens), then from the text tokens.
    """
    cached_image = min(tokens.cached_input_tokens, tokens.image_input_tokens)
    cached_text = min(tokens.cached_input_tokens - cached_image, tokens.text_input_tokens)
    per_million = (
        price.text_input * (tokens.text_input_tokens - cached_text)
        + price.cached_text_input * cached_text
        + price.image_input * (tokens.image_input_tokens - cached_image)
        + price.cached_image_input * cached_image
        + price.per_million_output_tokens * tokens.output_tokens
    )
    usd = price.per_image * images + per_million / 1_000_000
    return int((usd * NANOS_PER_USD).to_integral_value())


# OpenAI bills each partial image of a streamed answer as this many more output tokens.
OUTPUT_TOKENS_PER_PARTIAL_IMAGE = 100


def worst_case_cost_nanos(
    price: ModelPrice, *, n: int, input_images: int, prompt_bytes: int, partial_images: int = 0
) -> int:
    """The most a request may cost before it is made, priced like an answer by
    estimate_cost_nanos: `n` images, each at its most output tokens (and its partial images),
    every input image (mask and markup included) at its most input tokens, uncached, and the
    prompt at one token per byte (a token is never shorter than a byte)."""
    partials = partial_images * OUTPUT_TOKENS_PER_PARTIAL_IMAGE
    output = n * (price.max_output_tokens_per_image + partials)
    image_input = input_images * price.max_input_tokens_per_image
    tokens = TokenUsage(
        input_tokens=image_input + prompt_bytes,
        output_tokens=output,
        total_tokens=image_input + prompt_bytes + output,
        text_input_tokens=prompt_bytes,
        image_input_tokens=image_input,
    )
    return estimate_cost_nanos(price, n, tokens)


def tokens_of(body: dict[str, Any]) -> TokenUsage:
    """The answer's `usage`. Input that `input_tokens_details` does not call image tokens counts
    as text: an upstream that omits the details (the gateway then fills in zeros) is priced at
    the text rate, as a model with one input rate always was."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return TokenUsage()
    details = usage.get("input_tokens_details")
    details = details if isinstance(details, dict) else {}
    input_tokens = _count(usage, "input_tokens")
    image = min(_count(details, "image_tokens"), input_tokens)
    return TokenUsage(
        input_tokens=input_tokens,
        output_tokens=_count(usage, "output_tokens"),
        total_tokens=_count(usage, "total_tokens"),
        text_input_tokens=input_tokens - image,
        image_input_tokens=image,
        cached_input_tokens=min(_count(details, "cached_tokens"), input_tokens),
    )


def _count(source: dict[str, Any], name: str) -> int:
    value = source.get(name)
    # bool is an int subclass: `true` is no token count.
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def day_of(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y%m%d")


class UsageLedger:
    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        namespace: str,
        clock: Callable[[], float] = time.time,
        on_store_error: Callable[[str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._namespace = namespace
        self._clock = clock
        self._on_store_error = on_store_error
        self._pending: dict[tuple[str, str], int] = {}

    def _key(self, client: str, day: str) -> str:
        return f"{self._namespace}:{{client:{client}}}:usage:{day}"

    async def record(self, client: str, model: str, usage: Usage) -> None:
        key = self._key(client, day_of(self._clock()))
        increments = {
            (key, f"{model}|{name}"): value for name, value in asdict(usage).items() if value
        }
        for item, value in self._pending.items():
            increments[item] = increments.get(item, 0) + value
        self._pending = {}
        try:
            with store_errors("record usage"):
                async with self._redis.pipeline(transaction=False) as pipe:
                    for (hash_key, field), value in increments.items():
                        pipe.hincrby(hash_key, field, value)
                    for hash_key in {hash_key for hash_key, _ in increments}:
                        pipe.expire(hash_key, USAGE_TTL_SECONDS)
                    await pipe.execute()
        except StoreUnavailable as exc:
            log.warning("redis: cannot record usage, kept for later (%s)", exc.cause)
            if self._on_store_error is not None:
                self._on_store_error("client_usage")
            for item, value in increments.items():
                if item in self._pending or len(self._pending) < MAX_PENDING:
                    self._pending[item] = self._pending.get(item, 0) + value

    async def rows(self, clients: Iterable[str], first: date, last: date) -> list[UsageRow]:
        """What was recorded per client, UTC day and model between `first` and `last`
        (inclusive), in that order; days and models without usage have no row."""
        days = [first + timedelta(days=offset) for offset in range((last - first).days + 1)]
        wanted = [(client, day) for client in clients for day in days]
        with store_errors("read usage"):
            async with self._redis.pipeline(transaction=False) as pipe:
                for client, day in wanted:
                    pipe.hgetall(self._key(client, day.strftime("%Y%m%d")))
                results = await pipe.execute()
        rows: list[UsageRow] = []
        for (client, day), raw in zip(wanted, results, strict=True):
            per_model: dict[str, dict[str, int]] = {}
            for field, value in raw.items():
                name = field.decode() if isinstance(field, bytes) else field
                model, _, counter = name.rpartition("|")
                if counter in COUNTERS:
                    per_model.setdefault(model, dict.fromkeys(COUNTERS, 0))[counter] = int(value)
            rows += [UsageRow(client, day, model, per_model[model]) for model in sorted(per_model)]
        return rows

    async def report(self, clients: Iterable[str], first: date, last: date) -> dict[str, Any]:
        """Usage rows per client, day and model between `first` and `last` (UTC, inclusive)."""
        rows = await self.rows(clients, first, last)
        totals = dict.fromkeys(COUNTERS, 0)
        for row in rows:
            for name, value in row.counters.items():
                totals[name] += value
        return {
            "object": "usage",
            "from": first.isoformat(),
            "to": last.isoformat(),
            "data": [row.shown() for row in rows],
            "totals": shown_counters(totals),
        }


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One client's usage of one model on one UTC day: every counter of Usage."""

    client: str
    day: date
    model: str
    counters: dict[str, int]

    def shown(self, usd: Callable[[int], object] | None = None) -> dict[str, Any]:
        """As /admin/usage and the export show it: money in USD (`usd` turns nano-dollars into
        the value shown; a float by default)."""
        return {
            "client": self.client,
            "date": self.day.isoformat(),
            "model": self.model,
            **shown_counters(self.counters, usd),
        }


def _shown_name(counter: str) -> str:
    return counter.removesuffix(_NANO_USD) + "_usd" if counter.endswith(_NANO_USD) else counter


# What a report row shows, derived from Usage: a counter added there is shown (and exported)
# with no change here. Money counters are kept in nano-dollars and shown in USD, after the rest.
SHOWN_COUNTERS = tuple(
    [name for name in COUNTERS if not name.endswith(_NANO_USD)]
    + [_shown_name(name) for name in COUNTERS if name.endswith(_NANO_USD)]
)


def shown_counters(
    counters: dict[str, int], usd: Callable[[int], object] | None = None
) -> dict[str, Any]:
    to_usd = usd or usd_float
    return {
        _shown_name(name): to_usd(counters[name]) if name.endswith(_NANO_USD) else counters[name]
        for name in sorted(counters, key=lambda name: name.endswith(_NANO_USD))
    }


def usd_float(nanos: int) -> float:
    # Nano-dollar sums are exact; a float with 9 decimals shows them faithfully in JSON.
    return round(nanos / 1_000_000_000, 9)


def usd_text(nanos: int) -> str:
    """Exact USD with nine decimals, for text formats (CSV) where a float could read 1e-09."""
    return format(Decimal(nanos) / NANOS_PER_USD, ".9f")
