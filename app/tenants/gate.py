"""The client's side of one edit: limits on the way in, permission for the model, image charges
and spend reservations around the upstream call, and usage on the way out.

    async with gate.enter(policy, request_id) as metered:   # requests/min, concurrency
        ...intake, validation...
        await metered.charge(edit)        # 403 for a model not allowed; images/min, quotas,
                                          # the worst-case cost on the spend budgets
        ...cache or upstream...
        await metered.answered(edit, body, cache_hit=...)    # or metered.failed(edit, error)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from app.errors import MAYBE_BILLED, GatewayError, PermissionDenied, QuotaExceeded
from app.intake.request import EditRequest
from app.observability.metrics import GatewayMetrics
from app.tenants.budgets import Budgets, Reservation
from app.tenants.directory import ClientPolicy
from app.tenants.limiter import Limiter, Slot
from app.tenants.usage import (
    Usage,
    UsageLedger,
    estimate_cost_nanos,
    tokens_of,
    worst_case_cost_nanos,
)


class ClientGate:
    def __init__(
        self,
        limiter: Limiter,
        ledger: UsageLedger | None,
        metrics: GatewayMetrics,
        budgets: Budgets | None = None,
    ) -> None:
        self._limiter = limiter
        self._ledger = ledger
        self.metrics = metrics
        self.budgets = budgets

    @property
    def limiter(self) -> Limiter:
        return self._limiter

    @asynccontextmanager
    async def enter(self, policy: ClientPolicy, request_id: str) -> AsyncIterator[MeteredEdit]:
        slot = await self._limiter.admit(policy, request_id)
        try:
            yield MeteredEdit(self, slot)
        finally:
            await slot.release()

    async def _record(self, policy: ClientPolicy, edit: EditRequest, usage: Usage) -> None:
        if self._ledger is not None:
            await self._ledger.record(policy.name, edit.model.name, usage)


class MeteredEdit:
    def __init__(self, gate: ClientGate, slot: Slot) -> None:
        self._gate = gate
        self._slot = slot
        self._reservation: Reservation | None = None

    @property
    def policy(self) -> ClientPolicy:
        return self._slot.policy

    @property
    def headers(self) -> dict[str, str]:
        """`x-ratelimit-*` headers for the response."""
        return self._slot.headers

    def allow(self, edit: EditRequest) -> None:
        try:
            self.policy.check_model(edit.model)
        except PermissionDenied:
            self._gate.metrics.record_client_refusal(self.policy.name, "model_not_allowed")
            raise

    # Charge before anything is paid for (a cache lookup, an upstream call), then exactly one of
    # answered() or failed().
    async def charge(self, edit: EditRequest) -> None:
        """Charge `n` images to images/min and the quotas, then reserve the request's worst-case
        cost on the spend budgets (429 when over either), before any upstream call. 403 first if
        the client may not use the model."""
        self.allow(edit)
        await self._slot.take_images(edit.n)
        budgets = self._gate.budgets
        if budgets is None:
            return
        try:
            self._reservation = await budgets.reserve(self.policy.name, worst_case(edit))
        except QuotaExceeded:
            await self._slot.settle(0)  # refused: nothing will be made
            raise

    async def answered(
        self,
        edit: EditRequest,
        body: dict[str, Any],
        *,
        images: int | None = None,
        cache_hit: bool = False,
        calls_saved: int = 1,
    ) -> None:
        """Account an answer (`images` when `body` carries no `data`). A cache hit gives the
        image charge back (no upstream made anything) and notes the calls and cost it saved;
        otherwise the charge is kept for the images made."""
        images = _image_count(body) if images is None else images
        tokens = tokens_of(body)
        cost = estimate_cost_nanos(edit.model.price, images, tokens)
        if cache_hit:
            await self._slot.settle(0)
            await self._settle_spend(0)
            usage = Usage(
                requests=1,
                cache_hits=1,
                cached_images=images,
                upstream_calls_saved=calls_saved,
                input_bytes=_input_bytes(edit),
                saved_input_tokens=tokens.input_tokens,
                saved_output_tokens=tokens.output_tokens,
                saved_nano_usd=cost,
            )
        else:
            await self._slot.settle(images)
            await self._settle_spend(cost)
            usage = Usage(
                requests=1,
                images=images,
                input_bytes=_input_bytes(edit),
                input_tokens=tokens.input_tokens,
                output_tokens=tokens.output_tokens,
                total_tokens=tokens.total_tokens,
                cost_nano_usd=cost,
            )
        await self._gate._record(self.policy, edit, usage)
        self._gate.metrics.record_client_edit(
            self.policy.name,
            edit.model.name,
            outcome="cache_hit" if cache_hit else "ok",
            images=images,
            cost_usd=0.0 if cache_hit else cost / 1e9,
            saved_usd=cost / 1e9 if cache_hit else 0.0,
        )

    async def failed(self, edit: EditRequest, error: GatewayError) -> None:
        """Account a failed upstream call: the charge is given back unless the upstream may
        have done (and billed) the work."""
        maybe_billed = error.failure in MAYBE_BILLED
        await self._slot.settle(None if maybe_billed else 0)
        await self._settle_spend(None if maybe_billed else 0)
        await self._gate._record(self.policy, edit, Usage(errors=1, input_bytes=_input_bytes(edit)))
        self._gate.metrics.record_client_edit(
            self.policy.name, edit.model.name, outcome="error", images=0, cost_usd=0.0
        )

    async def _settle_spend(self, cost: int | None) -> None:
        if self._reservation is not None:
            await self._reservation.settle(cost)


def worst_case(edit: EditRequest) -> int:
    """The most this request may cost upstream, in nano-USD, at its model's catalog price."""
    overlays = sum(overlay is not None for overlay in (edit.mask, edit.markup))
    return worst_case_cost_nanos(
        edit.model.price,
        n=edit.n,
        input_images=len(edit.images) + overlays,
        prompt_bytes=len(edit.prompt.encode()),
        partial_images=edit.partial_images if edit.stream else 0,
    )


def _image_count(body: dict[str, Any]) -> int:
    data = body.get("data")
    return len(data) if isinstance(data, list) else 0


def _input_bytes(edit: EditRequest) -> int:
    overlays = (edit.mask, edit.markup)
    total = sum(image.upload.size for image in edit.images)
    return total + sum(overlay.upload.size for overlay in overlays if overlay is not None)
