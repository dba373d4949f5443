"""The objects one gateway process shares across requests, opened and closed in the lifespan."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx
import redis.asyncio as aioredis
from pydantic import SecretStr

from app.cache.service import EditCache
from app.cache.setup import open_edit_cache
from app.config.settings import PoolConfig, Settings
from app.intake.request import EditRequest
from app.intake.spool import SpoolWorker
from app.keys.health import HealthPolicy
from app.keys.pool import KeyPool, PoolUpstream
from app.keys.prober import Prober
from app.keys.store import FailoverStore, MemoryStore, RedisStore, StateStore
from app.observability.metrics import GatewayMetrics
from app.observability.redaction import Redactor
from app.routing.forwarder import AttemptNote, Forwarder, Route
from app.service.edits import ImageService
from app.shared_state.durability import DurabilityCheck
from app.shared_state.factory import open_redis
from app.tenants.services import ClientServices, open_client_services
from app.upstream.aiohttp_transport import AiohttpTransport, UpstreamPool
from app.upstream.base import PartialSink, Upstream, UpstreamAnswer
from app.upstream.egress import Egress, Proxy
from app.upstream.fetch import ImageFetcher
from app.upstream.registry import DIALECTS

log = logging.getLogger("gateway")


@dataclass
class UpstreamHttp:
    """The httpx clients upstream calls go through, one per egress route, over one pool."""

    # The environment's proxies (or none): upstreams without their own `proxy:`, and the
    # downloads of result URLs upstreams answer with.
    default: httpx.AsyncClient
    # Upstreams that name their own `proxy:`.
    by_upstream: dict[str, httpx.AsyncClient]
    # Client-supplied image URLs: direct, or image_urls.proxy; never the environment's.
    image_urls: httpx.AsyncClient
    # The connections under all of them; None when a test hands in its own transport.
    pool: UpstreamPool | None

    def for_upstream(self, name: str) -> httpx.AsyncClient:
        return self.by_upstream.get(name, self.default)

    async def aclose(self) -> None:
        for client in (self.default, self.image_urls, *self.by_upstream.values()):
            await client.aclose()
        if self.pool is not None:
            await self.pool.aclose()


@dataclass
class Gateway:
    settings: Settings
    http: UpstreamHttp
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
    # The state Redis' persistence and eviction policy, as last read; None without Redis.
    durability: DurabilityCheck | None = None

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
    for proxy in _proxies(settings):
        values += proxy.secrets()
    return values


def environment_egress(settings: Settings) -> Egress:
    return Egress.from_environment(
        {name: value.get_secret_value() for name, value in settings.proxy_environment.items()}
    )


def _configured_proxy(url: str, auth: SecretStr | None) -> Proxy:
    return Proxy.parse(url, auth.get_secret_value() if auth is not None else None)


def _proxies(settings: Settings) -> list[Proxy]:
    configured = [(upstream.proxy, upstream.proxy_auth) for upstream in settings.upstreams.values()]
    configured.append((settings.image_urls.proxy, settings.image_urls.proxy_auth))
    proxies = environment_egress(settings).proxies
    proxies += [_configured_proxy(url, auth) for url, auth in configured if url is not None]
    return proxies


def open_http(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> UpstreamHttp:
    """The upstream clients over one aiohttp pool, or over `transport` (a test's seam, which
    then sees every request, proxies aside). Needs the running event loop."""
    pool = None
    if transport is None:
        in_use = [settings.upstreams[name] for name in settings.catalog.upstreams_in_use()]
        # Loading the CA bundle takes tens of milliseconds: done here, not inside the first
        # https request (where it would stall every request on the event loop). Without an https
        # upstream or image URLs, aiohttp's own verified context (built at its import) serves.
        https = settings.image_urls.enabled or any(
            upstream.base_url.startswith("https:") for upstream in in_use if not settings.demo
        )
        pool = UpstreamPool(
            max_connections=settings.http.max_connections,
            keepalive_expiry=settings.http.keepalive_expiry,
            ssl_context=httpx.create_ssl_context() if https else None,
        )
    max_response_bytes = int(settings.http.max_response_bytes)

    def client(egress: Egress) -> httpx.AsyncClient:
        route: httpx.AsyncBaseTransport
        if pool is not None:
            route = AiohttpTransport(pool, egress=egress, max_response_bytes=max_response_bytes)
        else:
            assert transport is not None
            route = transport
        # Per-request timeouts are set by each upstream; this default only guards stray calls.
        # trust_env=False: httpx reads the environment only for transports of its own; its
        # proxies reach ours through Egress. No cookie jar: one upstream answer's Set-Cookie
        # must not ride along on every later request, whichever client sent it.
        return httpx.AsyncClient(
            timeout=httpx.Timeout(300.0, connect=5.0),
            transport=route,
            trust_env=False,
            cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        )

    image_urls = settings.image_urls
    return UpstreamHttp(
        default=client(environment_egress(settings)),
        by_upstream={
            name: client(Egress.through(_configured_proxy(config.proxy, config.proxy_auth)))
            for name, config in settings.upstreams.items()
            if config.proxy is not None
        },
        image_urls=client(
            Egress.through(_configured_proxy(image_urls.proxy, image_urls.proxy_auth))
            if image_urls.proxy is not None
            else Egress.direct()
        ),
        pool=pool,
    )


def open_gateway(
    settings: Settings,
    *,
    metrics: GatewayMetrics,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Gateway:
    http = open_http(settings, transport)
    redactor = Redactor(secrets_of(settings))
    upstreams: dict[str, Upstream] = {}
    pooled: list[PoolUpstream] = []
    routes: dict[str, Route] = {}
    for name in sorted(settings.catalog.upstreams_in_use()):
        config = settings.upstreams[name]
        routes[name] = Route(priority=config.priority, weight=config.weight)
        dialect = DIALECTS["demo" if settings.demo else config.type]
        upstreams[name] = dialect.build(name, config, http.for_upstream(name), redactor)
        keys = config.key_specs if dialect.keyed else ()
        pooled.append(PoolUpstream(name, keys, config.max_concurrency))
    if settings.demo:
        log.warning("demo mode: every model is served by the built-in demo upstream")
    # The state Redis: key health, client keys, limits, quotas, usage. The cache opens its own
    # client (app/cache/setup.py), on GATEWAY_CACHE_REDIS_URL when that is set.
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

    cache = open_edit_cache(settings, http=http.default, forward=forward, events=metrics)
    clients = open_client_services(settings, redis, metrics)
    spool_worker = SpoolWorker()
    image_urls = (
        ImageFetcher(http.image_urls, settings.image_urls, subject="The image")
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
        durability=(
            DurabilityCheck(redis, shared_with_cache=settings.cache_redis_url is None)
            if redis is not None
            else None
        ),
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
