"""The client services one gateway process holds, built from Settings and the shared Redis."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

from app.config.settings import Settings
from app.observability.metrics import GatewayMetrics
from app.tenants.budgets import Budgets
from app.tenants.directory import ClientDirectory
from app.tenants.gate import ClientGate
from app.tenants.keystore import RuntimeKeyStore
from app.tenants.limiter import Limiter
from app.tenants.usage import UsageLedger


@dataclass
class ClientServices:
    directory: ClientDirectory
    gate: ClientGate
    # Both need Redis; without it runtime keys and usage reports are unavailable (503).
    keys: RuntimeKeyStore | None
    usage: UsageLedger | None


def open_client_services(
    settings: Settings,
    redis: aioredis.Redis | None,
    metrics: GatewayMetrics,
) -> ClientServices:
    namespace = settings.clients.namespace
    on_error = metrics.record_redis_error
    keys = (
        RuntimeKeyStore(redis, namespace=namespace, on_store_error=on_error)
        if redis is not None
        else None
    )
    usage = (
        UsageLedger(redis, namespace=namespace, on_store_error=on_error)
        if redis is not None
        else None
    )
    limiter = Limiter(
        redis,
        namespace=namespace,
        on_store_error=on_error,
        on_refused=metrics.record_client_refusal,
    )
    directory = ClientDirectory(settings.clients, env_keys=settings.client_keys, runtime_keys=keys)
    # Budgets are state, like the limits: the same Redis as the limiter.
    budgets = Budgets.from_config(
        redis,
        settings.clients,
        {name: directory.policy(name).limits for name in directory.names},
        on_store_error=on_error,
        on_refused=metrics.record_client_refusal,
    )
    metrics.watch_budgets(budgets.used_ratios)
    return ClientServices(
        directory=directory,
        gate=ClientGate(limiter, usage, metrics, budgets),
        keys=keys,
        usage=usage,
    )
