"""Build the process's EditCache from settings: the cache's Redis (GATEWAY_CACHE_REDIS_URL, else
the state Redis) when configured, else the in-process LRU."""

from __future__ import annotations

import logging
from urllib.parse import SplitResult, urlsplit

import httpx

from app.cache.service import CacheEvents, EditCache, Forward
from app.cache.store import CacheStore, MemoryStore, RedisStore
from app.config.settings import Settings
from app.intake.request import EditRequest
from app.shared_state.factory import open_redis
from app.upstream.fetch import ImageFetcher

log = logging.getLogger("gateway.cache")


def open_edit_cache(
    settings: Settings,
    *,
    http: httpx.AsyncClient,
    forward: Forward,
    events: CacheEvents | None = None,
) -> EditCache:
    config = settings.cache
    store: CacheStore
    # Entries, hosted files and single-flight leases may all be evicted: they belong on a Redis
    # of their own (allkeys-lru), apart from the state Redis (noeviction).
    url = settings.cache_redis_url or settings.redis_url
    if url is not None:
        timeout = config.redis_timeout_seconds
        # Every cache command may run twice (lookups and renewals recognise their own token).
        client = open_redis(
            url.get_secret_value(), timeout=timeout, resend_on_closed_connection=True
        )
        store = RedisStore(client, timeout=timeout, retry_after=config.redis_retry_after_seconds)
    else:
        store = MemoryStore(max_bytes=int(config.embedded_max_bytes))
        log.warning(
            "no GATEWAY_REDIS_URL nor GATEWAY_CACHE_REDIS_URL: cache entries and hosted image "
            "files live in this process (up to %d bytes); run a single replica, or configure Redis",
            int(config.embedded_max_bytes),
        )
    # A reseller serves its results from its own address: its host and port are allowed too.
    upstream_urls = [urlsplit(upstream.base_url) for upstream in settings.upstreams.values()]
    fetch = ImageFetcher(
        http,
        config.fetch,
        extra_hosts=[url.hostname for url in upstream_urls if url.hostname],
        extra_ports=[port for url in upstream_urls if (port := _port(url))],
    )

    def call_seconds(edit: EditRequest) -> float:
        # What app/routing/forwarder.py allows one request upstream: each attempt bounded by the
        # model's (or its upstreams') timeout, all of them by retry.deadline; then downloading
        # a result the upstream answered as a URL.
        totals = [
            settings.upstreams[name].timeouts.total
            for name in edit.model.upstreams
            if name in settings.upstreams
        ]
        attempt = edit.model.timeout or max(totals, default=300.0)
        retry = settings.retry
        return min(retry.deadline, retry.max_attempts * attempt) + config.fetch.timeout

    return EditCache(
        store=store,
        forward=forward,
        fetch=fetch,
        config=config,
        call_seconds=call_seconds,
        events=events,
    )


def _port(url: SplitResult) -> int | None:
    try:
        return url.port
    except ValueError:  # out of range: that upstream fails on its own, its results with it
        return None
