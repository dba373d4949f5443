"""Typed dependencies shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.tenants.directory import ClientPolicy
from app.wiring import Gateway


def gateway_of(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def client_of(request: Request, gateway: Gateway) -> ClientPolicy:
    """The calling client's policy (auth put its name in the request state)."""
    name: str = getattr(request.state, "client_id", None) or "anonymous"
    return gateway.clients.directory.policy(name)


# Dependencies are async on purpose: FastAPI runs a plain `def` dependency in a worker thread,
# and that hop cost more than anything else the route does before reading the body.
async def get_gateway(request: Request) -> Gateway:
    return gateway_of(request)


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def get_client(request: Request, gateway: GatewayDep) -> ClientPolicy:
    return client_of(request, gateway)


ClientDep = Annotated[ClientPolicy, Depends(get_client)]
