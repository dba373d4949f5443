"""Helpers for client tests: an async Redis on the private test server, a fresh namespace per
test, policies, and validated edits built from real images."""

from __future__ import annotations

import secrets

import pytest
import redis.asyncio as aioredis

from app.config.catalog import Catalog
from app.config.settings import load_settings
from app.config.tenants import ClientLimits
from app.intake.request import EditRequest, ImageInput
from app.intake.sniff import HEAD_BYTES, TAIL_BYTES, sniff_image
from app.intake.spool import SpooledUpload
from app.shared_state.factory import open_redis
from app.tenants.directory import ClientPolicy
from tests.support import images
from tests.support.constants import CONFIG
from tests.support.redis_topologies import with_db

# A database of its own on the shared test Redis: other suites scan theirs and must not see ours.
CLIENTS_DB = 3


@pytest.fixture(scope="session")
def clients_redis_url(redis_url: str) -> str:
    return with_db(redis_url, CLIENTS_DB)


def fresh_namespace() -> str:
    return "t-" + secrets.token_hex(6)


def redis_client(url: str) -> aioredis.Redis:
    return open_redis(url, timeout=1.0)


def policy(name: str = "team", models: set[str] | None = None, **limits: int) -> ClientPolicy:
    return ClientPolicy(
        name, frozenset(models) if models is not None else None, ClientLimits(**limits)
    )


def catalog() -> Catalog:
    env = {
        "GATEWAY_CONFIG": str(CONFIG),
        "GATEWAY_UPSTREAM_KEYS": "sk-x",
        "GATEWAY_CLIENT_KEYS": "k",
    }
    return load_settings(env=env).catalog


def edit_request(model: str = "gpt-image-1", n: int = 1, data: bytes | None = None) -> EditRequest:
    data = data if data is not None else images.png(64, 64)
    upload = SpooledUpload("image", "a.png", threshold=1 << 20, spool_dir=None)
    upload.write(data)
    info = sniff_image(upload.head(HEAD_BYTES), upload.tail(TAIL_BYTES), upload.size)
    rule = catalog().models[model]
    return EditRequest(
        model=rule,
        prompt="x",
        images=(ImageInput(upload=upload, info=info, param="image"),),
        mask=None,
        params={"n": n},
        extra_fields=(),
        response_format=None,
        n=n,
    )
