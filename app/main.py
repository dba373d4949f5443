"""create_app() and the lifespan that opens the process's shared clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from app.api import admin, files, health, images, models
from app.api import metrics as metrics_api
from app.config.settings import Settings, load_settings
from app.errors import StoreUnavailable, install_error_handlers
from app.observability.access_log import ObservabilityMiddleware
from app.observability.logs import install_redaction
from app.observability.metrics import GatewayMetrics
from app.observability.redaction import Redactor
from app.server.admission import ConcurrencyLimitMiddleware
from app.server.auth import PUBLIC_PATHS, ClientAuthMiddleware
from app.server.drain import Drain, DrainMiddleware
from app.server.heap import keep_freed_heap, malloc_trim, trim_heap_periodically
from app.server.request_id import RequestIdMiddleware
from app.shared_state.health import check_redis, watch_redis
from app.tenants.directory import ANONYMOUS, ClientDirectory, client_names
from app.wiring import Gateway, open_gateway, secrets_of


def create_app(
    settings: Settings | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """Build the ASGI app. Settings are read here, once, never at import time; the metrics
    are built here, once, and handed to everything that records."""
    settings = settings if settings is not None else load_settings()
    # Here, not in the CLI: with --workers each worker process builds its own app.
    keep_freed_heap(int(settings.limits.malloc_keep_bytes))
    clients = client_names(settings.clients, len(settings.client_keys))
    metrics = GatewayMetrics(
        models=settings.catalog.models,
        multiprocess_dir=settings.metrics_multiprocess_dir,
        clients=clients,
    )
    metrics.show_known_series_at_zero(
        routes=[route.path for route in images.routes],
        served_models=served_models(settings),
        # The anonymous client sends nothing where anonymous requests are refused.
        clients=[name for name in clients if name != ANONYMOUS or settings.allow_anonymous],
        redis=settings.redis_url is not None or settings.cache_redis_url is not None,
        teams=settings.clients.teams,
    )
    drain = Drain(settings.shutdown.drain_timeout)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = open_gateway(settings, metrics=metrics, transport=transport)
        app.state.gateway = gateway
        unredact = install_redaction(gateway.redactor)
        # Connect before the first request: finding a Cluster's slots or Sentinel's primary must
        # not be paid inside a request's cache budget (that request would go uncached), nor by a
        # burst of first requests at once. Both clients: the cache's, and the one the key pool and
        # client limits share. Failing here only means Redis is down now; requests then fail open
        # as usual.
        with contextlib.suppress(StoreUnavailable):
            await gateway.cache.store.check()
        if gateway.redis is not None:
            await check_redis(gateway.redis, metrics, "health")
        if gateway.durability is not None:
            # Warns (once) when state would not survive a restart or could be evicted.
            await gateway.durability.check()
        unhook = drain.open()
        watcher = (
            asyncio.create_task(watch_redis(gateway.redis, metrics, durability=gateway.durability))
            if gateway.redis is not None
            else None
        )
        trimmer = asyncio.create_task(trim_heap_periodically(malloc_trim()))
        gateway.start()
        try:
            yield
        finally:
            trimmer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await trimmer
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            unhook()
            # Whatever is left of the drain limit: one budget for the whole shutdown, not a
            # second full one for paid calls whose clients have left.
            await gateway.aclose(grace=drain.remaining())
            metrics.close()
            unredact()

    app = FastAPI(
        title="image-gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        # A trailing-slash redirect would build its Location from the client's Host header.
        redirect_slashes=False,
    )
    app.state.drain = drain
    install_error_handlers(app, redact=Redactor(secrets_of(settings)))
    app.router.routes.extend(images.routes)
    app.include_router(models.router)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(admin.router)
    public_paths = PUBLIC_PATHS
    if settings.metrics.enabled:
        app.include_router(metrics_api.router)
        if settings.metrics.public or settings.metrics_token is not None:
            # The route checks the metrics token itself (or nothing, when public).
            public_paths = public_paths | {"/metrics"}
    # Outermost last: the request id wraps everything so that even a 401 carries one; the
    # observability layer sits outside auth and drain so their refusals are counted and logged.

    def client_directory() -> ClientDirectory:
        gateway: Gateway = app.state.gateway
        return gateway.clients.directory

    # Only authenticated requests count against the in-flight limit (auth runs first).
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        max_in_flight=settings.limits.max_in_flight,
        retry_after_seconds=settings.limits.overload_retry_after,
    )
    app.add_middleware(
        ClientAuthMiddleware,
        keys=settings.client_keys,
        allow_anonymous=settings.allow_anonymous,
        admin_keys=settings.admin_keys,
        public_paths=public_paths,
        public_get=None if settings.cache.files_require_auth else files.FILE_PATH,
        clients=client_directory,
    )
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


def served_models(settings: Settings) -> dict[str, list[str]]:
    """Each upstream in use -> the catalog models it serves."""
    return {
        upstream: [
            name for name, model in settings.catalog.models.items() if upstream in model.upstreams
        ]
        for upstream in sorted(settings.catalog.upstreams_in_use())
    }
