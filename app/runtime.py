"""The objects one gateway process shares across requests, opened and closed in the lifespan."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import redis.asyncio as aioredis

from app.cache.service import EditCache
from app.cache.setup import open_edit_cache
from app.clients.services import ClientServices, open_client_services
from app.config import PoolConfig, Settings
from app.edit import EditRequest
from app.forwarding import AttemptNote, Forwarder, Route
from app.intake.spool import SpoolWorker
from app.keys.health import HealthPolicy
from app.keys.pool import KeyPool, PoolUpstream
from app.keys.prober import Prober
from app.keys.store import FailoverStore, MemoryStore, RedisStore, StateStore
from app.metrics import GatewayMetrics
from app.redaction import Redactor
from app.redis_client import open_redis
from app.service.edits import ImageService
from app.upstream.base import PartialSink, Upstream, UpstreamAnswer
from app.upstream.fetch import ImageFetcher
from app.upstream.registry import DIALECTS
from app.upstream.transport import Http1Transport

log = logging.getLogger("gateway")


@dataclass
class Gateway:
    settings: Settings
    http: httpx.AsyncClient
    forwarder: Forwarder
    redactor: Redactor
    redis: aioredis.Redis | None
    metrics: GatewayMetrics
    cache: EditCache
    clients: ClientServices
    images: ImageService
    spool_worker: SpoolWorker | None = None
    # Fetches https image URLs of JSON edits; None unless image_urls.enabled.
    image_urls: ImageFetcher | None = None
    prober: Prober | None = field(default=None)

    def start(self) -> None:
        """Start background work; called from the lifespan, inside the event loop."""
        if self.prober is not None:
            self.prober.start()

    async def aclose(self, *, grace: float) -> None:
        """Close every client; paid upstream calls still running (their clients left) get
        `grace` seconds to finish and be stored."""
        if self.prober is not None:
            await self.prober.aclose()
        await self.cache.aclose(grace=grace)
        await self.cache.store.aclose()
        await self.http.aclose()
        if self.spool_worker is not None:
            self.spool_worker.shutdown()
        if self.redis is not None:
            await self.redis.aclose()


def secrets_of(settings: Settings) -> list[str]:
    values = [key.get_secret_value() for key in settings.client_keys + settings.admin_keys]
    if settings.metrics_token is not None:
        values.append(settings.metrics_token.get_secret_value())
    for client in settings.clients.named.values():
        values += [key.get_secret_value() for key in client.keys]
    for upstream in settings.upstreams.values():
        values += [key.get_secret_value() for key in upstream.keys]
    return values


def open_gateway(
    settings: Settings,
    *,
    metrics: GatewayMetrics,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Gateway:
    if transport is None:
        in_use = [settings.upstreams[name] for name in settings.catalog.upstreams_in_use()]
        # Loading the CA bundle takes ~20 ms: done here, not inside the first https request
        # (where it would stall every request on the event loop).
        https = settings.image_urls.enabled or any(
            upstream.base_url.startswith("https:") for upstream in in_use if not settings.demo
        )
        transport = Http1Transport(
            max_connections=settings.http.max_connections,
            max_keepalive_connections=settings.http.max_keepalive_connections,
            keepalive_expiry=settings.http.keepalive_expiry,
            ssl_context=httpx.create_ssl_context() if https else None,
            max_response_bytes=int(settings.http.max_response_bytes),
        )
    # Per-request timeouts are set by each upstream; this default only guards stray calls.
    # trust_env=False: proxies come from config, never from whatever the environment holds.
    # No cookie jar: one upstream answer's Set-Cookie must not ride along on every later request,
    # whichever client sent it.
    http = httpx.AsyncClient(
        timeout=httpx.Timeout(300.0, connect=5.0),
        transport=transport,
        trust_env=False,
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
    )
    redactor = Redactor(secrets_of(settings))
    upstreams: dict[str, Upstream] = {}
    pooled: list[PoolUpstream] = []
    routes: dict[str, Route] = {}
    for name in sorted(settings.catalog.upstreams_in_use()):
        config = settings.upstreams[name]
        routes[name] = Route(priority=config.priority, weight=config.weight)
        dialect = DIALECTS["demo" if settings.demo else config.type]
        upstreams[name] = dialect.build(name, config, http, redactor)
        keys = config.key_specs if dialect.keyed else ()
        pooled.append(PoolUpstream(name, keys, config.max_concurrency))
    if settings.demo:
        log.warning("demo mode: every model is served by the built-in demo upstream")
    redis = (
        open_redis(settings.redis_url.get_secret_value(), timeout=1.0)
        if settings.redis_url is not None
        else None
    )
    pool = KeyPool(
        pooled, _key_store(settings.pool, redis, metrics), policy=health_policy(settings.pool)
    )
    metrics.watch_keys(pool.snapshots)
    forwarder = Forwarder(upstreams, pool, routes=routes, retry=settings.retry, metrics=metrics)

    async def forward(
        edit: EditRequest, *, on_partial: PartialSink | None, on_attempt: AttemptNote | None
    ) -> UpstreamAnswer:
        answer, _upstream = await forwarder.edit(edit, on_partial=on_partial, on_attempt=on_attempt)
        return answer

    cache = open_edit_cache(settings, http=http, forward=forward, events=metrics)
    clients = open_client_services(settings, redis, metrics)
    spool_worker = SpoolWorker()
    image_urls = (
        ImageFetcher(http, settings.image_urls, subject="The image")
        if settings.image_urls.enabled
        else None
    )
    images = ImageService(
        settings,
        cache=cache,
        gate=clients.gate,
        redact=redactor,
        spool_worker=spool_worker,
        image_urls=image_urls,
    )
    return Gateway(
        settings=settings,
        http=http,
        forwarder=forwarder,
        redactor=redactor,
        redis=redis,
        metrics=metrics,
        cache=cache,
        clients=clients,
        images=images,
        spool_worker=spool_worker,
        image_urls=image_urls,
        prober=Prober(pool, upstreams, tick=min(1.0, settings.pool.probe_interval)),
    )


def health_policy(config: PoolConfig) -> HealthPolicy:
    return HealthPolicy(
        cooldown_initial=config.cooldown_initial,
        cooldown_max=config.cooldown_max,
        cooldown_hint_max=config.cooldown_hint_max,
        eject_after=config.eject_after,
        eject_base=config.eject_base,
        eject_max=config.eject_max,
        probe_interval=config.probe_interval,
        max_ejected_share=config.max_ejected_share,
        outlier_window=config.outlier_window,
    )


def _key_store(
    config: PoolConfig, redis: aioredis.Redis | None, metrics: GatewayMetrics
) -> StateStore:
    if redis is None:
        return MemoryStore()
    return FailoverStore(
        RedisStore(redis, config.namespace),
        MemoryStore(),
        clock=time.monotonic,
        on_redis_error=partial(metrics.record_redis_error, "keys"),
    )
