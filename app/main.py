"""create_app() and the lifespan that opens the process's shared clients."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI

from app.api import health, images, models
from app.auth import ClientAuthMiddleware
from app.config import Settings, load_settings
from app.errors import install_error_handlers
from app.request_id import RequestIdMiddleware
from app.runtime import open_gateway


def create_app(
    settings: Settings | None = None, *, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    """Build the ASGI app. Settings are read here, once, never at import time."""
    settings = settings if settings is not None else load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gateway = open_gateway(settings, transport=transport)
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(
        title="image-gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    install_error_handlers(app)
    app.include_router(images.router)
    app.include_router(models.router)
    app.include_router(health.router)
    # Outermost last: the request id wraps auth so that even a 401 carries one.
    app.add_middleware(
        ClientAuthMiddleware,
        keys=settings.client_keys,
        allow_anonymous=settings.allow_anonymous,
        admin_keys=settings.admin_keys,
    )
    app.add_middleware(RequestIdMiddleware)
    return app
