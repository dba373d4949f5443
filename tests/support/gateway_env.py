"""The environment and settings of a test gateway in front of one upstream: single attempt, the
test keys, no cache, and key health of its own."""

from __future__ import annotations

import uuid

from app.config.settings import Settings, load_settings
from tests.support.constants import CLIENT_KEY, SINGLE_ATTEMPT_CONFIG, UPSTREAM_KEYS


def gateway_env(upstream_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "GATEWAY_CONFIG": str(SINGLE_ATTEMPT_CONFIG),
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_UPSTREAM_KEYS": ",".join(UPSTREAM_KEYS),
        "GATEWAY_CLIENT_KEYS": CLIENT_KEY,
        # Off for the shared gateway, so tests that repeat an edit see every upstream call;
        # cache tests build their own gateways with it on.
        "GATEWAY_CACHE_ENABLED": "false",
        # Key health of its own: gateways sharing the test Redis must not share cooldowns.
        "GATEWAY_POOL_NAMESPACE": "t-" + uuid.uuid4().hex[:12],
    }
    env.update(overrides)
    return env


def gateway_settings(upstream_url: str, **overrides: str) -> Settings:
    return load_settings(env=gateway_env(upstream_url, **overrides))
