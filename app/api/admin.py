"""Admin routes (admin keys only, see app/server/auth.py): client keys at run time, clients, usage,
and the upstream key pool's health."""

from __future__ import annotations

import logging
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.config.tenants import CLIENT_NAME, RESERVED_NAME
from app.errors import InvalidRequest, NotFound, StoreUnavailable
from app.tenants.export import EXPORT_FORMATS, export_csv, export_jsonl
from app.tenants.keystore import RuntimeKeyStore
from app.tenants.usage import MAX_REPORT_DAYS, UsageLedger
from app.wiring import Gateway

router = APIRouter(prefix="/admin")
# Who may call which model changes here: ops want a trail (ids only; the key is never logged).
audit = logging.getLogger("gateway.admin")

_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str | None = Field(None, max_length=100)


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _keys(gateway: Gateway, name: str) -> RuntimeKeyStore:
    if not gateway.clients.directory.knows(name):
        raise NotFound(f"No client named {name[:64]!r} is configured.")
    if gateway.clients.keys is None:
        raise StoreUnavailable("Runtime client keys need Redis; set GATEWAY_REDIS_URL.")
    return gateway.clients.keys


@router.get("/clients")
async def list_clients(gateway: GatewayDep) -> Response:
    directory = gateway.clients.directory
    data = []
    for name in directory.names:
        policy = directory.policy(name)
        data.append(
            {
                "name": name,
                "models": sorted(policy.models) if policy.models is not None else None,
                "limits": policy.limits.model_dump(mode="json"),
            }
        )
    return _json({"object": "list", "data": data})


@router.get("/clients/{name}")
async def show_client(name: str, gateway: GatewayDep) -> Response:
    directory = gateway.clients.directory
    if not directory.knows(name):
        raise NotFound(f"No client named {name[:64]!r} is configured.")
    policy = directory.policy(name)
    used = await gateway.clients.gate.limiter.quota_used(name)  # 503 when Redis is down
    budgets = gateway.clients.gate.budgets
    spent = await budgets.spent(name) if budgets is not None else []  # 503 when Redis is down
    return _json(
        {
            "object": "client",
            "name": name,
            "models": sorted(policy.models) if policy.models is not None else None,
            "limits": policy.limits.model_dump(mode="json"),
            "quota_used": used,
            "budgets": spent,
        }
    )


@router.post("/clients/{name}/keys")
async def create_key(name: str, gateway: GatewayDep, body: NewKey | None = None) -> Response:
    store = _keys(gateway, name)
    key, record = await store.create(name, body.label if body is not None else None)
    audit.info(
        "client key created: client=%s id=%s",
        name,
        record.id,
        extra={"fields": {"client": name, "key_id": record.id, "action": "create"}},
    )
    # The only time the key is ever shown: only its SHA-256 digest is stored.
    return _json({"object": "client.key", **record.public(), "key": key}, status=201)


@router.get("/clients/{name}/keys")
async def list_keys(name: str, gateway: GatewayDep) -> Response:
    store = _keys(gateway, name)
    records = await store.list(name)
    return _json({"object": "list", "data": [record.public() for record in records]})


@router.delete("/clients/{name}/keys/{key_id}")
async def revoke_key(name: str, key_id: str, gateway: GatewayDep) -> Response:
    store = _keys(gateway, name)
    if not await store.revoke(name, key_id):
        raise NotFound(f"Client {name!r} has no key {key_id[:64]!r}.")
    audit.info(
        "client key revoked: client=%s id=%s",
        name,
        key_id,
        extra={"fields": {"client": name, "key_id": key_id, "action": "revoke"}},
    )
    return _json({"object": "client.key", "id": key_id, "client": name, "revoked": True})


@router.get("/usage")
async def usage(
    gateway: GatewayDep,
    client: Annotated[str | None, Query()] = None,
    first: Annotated[str | None, Query(alias="from")] = None,
    last: Annotated[str | None, Query(alias="to")] = None,
) -> Response:
    ledger, clients, start, end = _usage_scope(gateway, client, first, last)
    return _json(await ledger.report(clients, start, end))  # 503 when Redis is down


@router.get("/usage/export")
async def usage_export(
    gateway: GatewayDep,
    client: Annotated[str | None, Query()] = None,
    first: Annotated[str | None, Query(alias="from")] = None,
    last: Annotated[str | None, Query(alias="to")] = None,
    output: Annotated[str, Query(alias="format")] = "csv",
) -> Response:
    """One row per client, UTC day and model, every counter: CSV or JSON lines, for billing."""
    if output not in EXPORT_FORMATS:
        raise InvalidRequest(
            f"`format` must be one of: {', '.join(EXPORT_FORMATS)}.",
            param="format",
            code="invalid_format",
        )
    ledger, clients, start, end = _usage_scope(gateway, client, first, last)
    # Built whole before answering (366 days x clients x models fits): a Redis failure is then
    # a clean 503, never a file cut short under a 200.
    rows = await ledger.rows(clients, start, end)  # 503 when Redis is down
    rows.sort(key=lambda row: (row.day, row.client, row.model))
    body = export_csv(rows) if output == "csv" else export_jsonl(rows)
    media_type, extension = EXPORT_FORMATS[output]
    filename = f"usage-{start.isoformat()}-{end.isoformat()}.{extension}"
    return Response(
        body,
        media_type=media_type,
        headers={"content-disposition": f"attachment; filename={filename}"},
    )


def _usage_scope(
    gateway: Gateway, client: str | None, first: str | None, last: str | None
) -> tuple[UsageLedger, list[str], date, date]:
    """The ledger, the clients and the UTC days a usage report covers (default: today)."""
    ledger: UsageLedger | None = gateway.clients.usage
    if ledger is None:
        raise StoreUnavailable("Usage accounting needs Redis; set GATEWAY_REDIS_URL.")
    today = datetime.now(UTC).date()
    end = _date(last, "to") if last else today
    start = _date(first, "from") if first else end
    if start > end:
        raise InvalidRequest("`from` is after `to`.", param="from", code="invalid_date_range")
    if (end - start).days >= MAX_REPORT_DAYS:
        raise InvalidRequest(
            f"A report covers at most {MAX_REPORT_DAYS} days.",
            param="from",
            code="invalid_date_range",
        )
    if client is not None:
        # Past clients may have left config but not the books: any well-formed name is asked.
        if not (CLIENT_NAME.match(client) or RESERVED_NAME.match(client)):
            raise InvalidRequest("Not a client name.", param="client", code="invalid_client")
        return ledger, [client], start, end
    return ledger, list(gateway.clients.directory.names), start, end


def _date(value: str, param: str) -> date:
    try:
        if not _DATE.match(value):
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(
            f"`{param}` must be a date as YYYY-MM-DD (UTC).", param=param, code="invalid_date"
        ) from None


@router.get("/keys")
async def list_upstream_keys(gateway: GatewayDep) -> Response:
    """Every upstream key by id (never the secret) with its health, as the key pool sees it."""
    pool = gateway.forwarder.pool
    return _json({"object": "list", "store": pool.store.describe(), "data": await pool.snapshot()})
