"""Settings: config/gateway.yaml validated at startup, with GATEWAY_* environment overrides.

Secrets only ever come from the environment (an upstream names the variable holding its keys),
so committed YAML never holds a key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, ValidationError

from app.catalog import Catalog, load_catalog
from app.clients.config import ClientsConfig
from app.config_file import ConfigError, format_validation_error, read_yaml
from app.redis_client import RedisTarget, RedisUrlError
from app.upstream.egress import PROXY_VARIABLES, Egress, Proxy, ProxyUrlError

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
DEFAULT_UPSTREAM = "default"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UpstreamTimeouts(_Strict):
    connect: float = Field(5.0, gt=0)
    # Image edits take 60-150 s; chat-sized timeouts are the commonest peer bug.
    total: float = Field(300.0, gt=0)


Port = Annotated[int, Field(ge=1, le=65535)]


class UrlGuardConfig(_Strict):
    """Which URLs a fetch the gateway did not choose may reach (app/upstream/url_guard.py): BFL
    polling and result URLs, upstream result URLs, client-sent image URLs. One set of rules."""

    # Exact host names, `*.example.com` for any subdomain, or `*` for any host.
    allowed_hosts: tuple[str, ...] = ()
    # A URL's port, written or implied by its scheme, must be one of these: an allowed host's SSH,
    # Redis or admin port is no image server.
    allowed_ports: tuple[Port, ...] = Field((80, 443), min_length=1)
    # Plain http is refused unless this is true (local test setups).
    allow_http: bool = False
    # Loopback, private, link-local and metadata addresses, and IPv6 forms carrying them, are
    # refused unless this is true (tests and labs only).
    allow_private_addresses: bool = False


class BflSettings(UrlGuardConfig):
    """How a Black Forest Labs upstream polls its tasks and fetches their results."""

    # BFL's own examples poll every 0.5 s; a Kontext edit usually takes 5-30 s.
    poll_interval: float = Field(0.5, gt=0)
    # From a task's submission to its result; past it the client gets 504.
    poll_deadline: float = Field(300.0, gt=0)
    # Each poll or result download; a slow one is retried (polls) until the deadline.
    request_timeout: float = Field(30.0, gt=0)
    # Hosts the gateway may fetch polling and result URLs from (SSRF guard). `*.bfl.ai` matches
    # any subdomain of bfl.ai; other entries match exactly.
    allowed_hosts: tuple[str, ...] = ("*.bfl.ai",)
    max_result_bytes: ByteSize = ByteSize(50 * 1024 * 1024)
    # One request with n > 1 runs n tasks, at most this many at once.
    max_parallel_tasks: int = Field(4, ge=1, le=24)


class KeyLimits(_Strict):
    """Per-key caps; a key at a cap is skipped, never queued behind."""

    # Requests in flight on this key, per gateway replica.
    max_concurrency: int | None = Field(None, gt=0)
    # Requests started per minute on this key, counted across replicas (Redis).
    rpm: int | None = Field(None, gt=0)


class NamedKey(KeyLimits):
    """A key with its own name (shown in /admin/keys) and its own environment variable."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    env: str


class KeySpec(_Strict):
    """A resolved upstream key: its public id, its secret, and its caps."""

    id: str  # "<upstream>#<n>" or a NamedKey's name; never derived from the secret
    secret: SecretStr
    max_concurrency: int | None = None
    rpm: int | None = None


class UpstreamConfig(_Strict):
    type: Literal["openai", "demo", "bfl"] = "openai"
    base_url: str = ""
    keys_env: str | None = None
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    keys: tuple[SecretStr, ...] = ()
    bfl: BflSettings = BflSettings()
    # Routing: the lowest priority number is tried first; weight splits traffic within a tier.
    priority: int = Field(0, ge=0)
    weight: int = Field(1, ge=1)
    # Requests in flight to this upstream, per gateway replica; None means no cap.
    max_concurrency: int | None = Field(None, gt=0)
    key_limits: KeyLimits = KeyLimits()
    named_keys: tuple[NamedKey, ...] = ()
    # Filled at load time from keys_env and named_keys (with ids and caps); `keys` holds the same
    # secrets, in the same order.
    key_specs: tuple[KeySpec, ...] = ()
    # The egress proxy for every call to this upstream (edits, probes, BFL polls and results),
    # instead of the environment's HTTPS_PROXY/HTTP_PROXY/NO_PROXY: http://host:port. Its
    # credentials, if it takes any, come from the variable proxy_auth_env names (user:password).
    proxy: str | None = None
    proxy_auth_env: str | None = None
    # Filled at load time from proxy_auth_env.
    proxy_auth: SecretStr | None = None


class PoolConfig(_Strict):
    """Key health: cooldowns after 429, ejection after repeated failures, probes of dead keys."""

    # Redis key prefix; replicas sharing it share key health.
    namespace: str = Field("igw", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    # A 429 without a usable hint cools the key this long, doubling per repeat up to the max.
    cooldown_initial: float = Field(1.0, gt=0)
    cooldown_max: float = Field(60.0, gt=0)
    # The longest cooldown an upstream's own retry-after may impose.
    cooldown_hint_max: float = Field(3600.0, gt=0)
    # Consecutive 5xx/timeout failures held against a key that eject it, for eject_base x times
    # ejected. A failure is held against a key only when the key fails at more than twice the
    # rate of its healthiest sibling over the last outlier_window seconds (a storm across every
    # key is the upstream's); a failed connection never is.
    eject_after: int = Field(5, ge=1)
    eject_base: float = Field(30.0, gt=0)
    eject_max: float = Field(300.0, gt=0)
    outlier_window: float = Field(30.0, gt=0)
    # At most floor(keys x share) of an upstream's keys are ejected at once, never all of them:
    # 1 of 2 or 3 keys, 2 of 4 or 5. 0 turns ejection off.
    max_ejected_share: float = Field(0.5, ge=0, le=1)
    # How often a disabled key (401/403/402/insufficient_quota) is re-checked by a free probe.
    probe_interval: float = Field(60.0, gt=0)


class RetryConfig(_Strict):
    """How many times one client request may be tried upstream (see app/forwarding.py)."""

    max_attempts: int = Field(4, ge=1)
    # Retries of an upstream 5xx, each on another key.
    server_error_retries: int = Field(1, ge=0)
    # Covers every attempt of one request, in seconds.
    deadline: float = Field(900.0, gt=0)


class Limits(_Strict):
    max_body_bytes: ByteSize = ByteSize(220 * 1024 * 1024)
    max_file_bytes: ByteSize = ByteSize(50 * 1024 * 1024)
    max_parts: int = Field(64, ge=2)
    max_field_bytes: ByteSize = ByteSize(256 * 1024)
    max_part_header_bytes: ByteSize = ByteSize(16 * 1024)
    max_pixels: int = Field(100_000_000, gt=0)
    # Each upload keeps up to this many bytes in memory, the rest goes to a temp file.
    spool_threshold_bytes: ByteSize = ByteSize(2 * 1024 * 1024)
    spool_dir: str | None = None
    # A client that stops sending its body holds a connection and its spooled bytes: after this
    # many idle seconds (or this many in total) it gets 408 and the connection is closed.
    body_idle_timeout: float = Field(30.0, gt=0)
    body_timeout: float = Field(600.0, gt=0)
    # Requests in flight per process (0: no limit); beyond it, 503 with retry-after.
    max_in_flight: int = Field(256, ge=0)
    overload_retry_after: int = Field(2, ge=1, le=60)
    # Freed heap memory each process keeps for the next requests instead of returning it to the
    # kernel (glibc only; 0 keeps malloc's defaults). See app/memory.py.
    malloc_keep_bytes: ByteSize = ByteSize(64 * 1024 * 1024)


class HttpClientConfig(_Strict):
    """Connections to upstreams (app/upstream/aiohttp_transport.py), per process."""

    # Open at once, all upstreams together; beyond it calls wait.
    max_connections: int = Field(512, gt=0)
    # No longer used: idle connections are bounded by max_connections and keepalive_expiry.
    # Accepted so that existing files still load.
    max_keepalive_connections: int = Field(128, ge=0)
    # Seconds an idle connection is kept. Short on purpose: an upstream that closes an idle
    # connection just as it is reused loses that request, which is never sent again (it may have
    # been billed). Below the 5 s idle timeout of uvicorn and Node servers; a new connection costs
    # a few milliseconds beside an edit's minute.
    keepalive_expiry: float = Field(4.0, gt=0)
    # An upstream answer larger than this is cut off (a broken upstream must not take the memory).
    max_response_bytes: ByteSize = ByteSize(1024 * 1024 * 1024)


class MetricsConfig(_Strict):
    enabled: bool = True
    # true: GET /metrics needs no credentials (only for a port that is not reachable from
    # outside, as in docker-compose.yml). false: it needs GATEWAY_METRICS_TOKEN if that is set,
    # else any client key.
    public: bool = False


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"
    # Prompts are the clients' data: by default only their length is logged.
    log_prompts: bool = False


class ShutdownConfig(_Strict):
    # After SIGTERM, in-flight edits get this long to finish; any still running is then
    # answered 503 gateway_shutdown (app/drain.py), and the process exits.
    drain_timeout: float = Field(60.0, gt=0)


class FetchConfig(UrlGuardConfig):
    """Downloading image URLs an upstream answers with (they expire in 10-60 minutes)."""

    # The hosts (and ports) of configured upstreams are always allowed: a reseller serves its own
    # results.
    allowed_hosts: tuple[str, ...] = (
        "oaidalleapiprodscus.blob.core.windows.net",
        "*.openai.com",
        "*.bfl.ai",
    )
    max_bytes: ByteSize = ByteSize(50 * 1024 * 1024)
    timeout: float = Field(30.0, gt=0)
    max_redirects: int = Field(3, ge=0)


class ImageUrlConfig(FetchConfig):
    """https image URLs in JSON edits (`images: [{"image_url": "https://..."}]`), fetched by the
    gateway through the same SSRF guard; off unless enabled. `*` allows any public host."""

    enabled: bool = False
    allowed_hosts: tuple[str, ...] = ("*",)
    max_bytes: ByteSize = ByteSize(25 * 1024 * 1024)
    timeout: float = Field(15.0, gt=0)
    # Client-supplied URLs never go through the environment's proxy: only through this one, if
    # set (http://host:port; credentials from the variable proxy_auth_env names). The SSRF guard
    # still resolves and checks the host first, and the proxy is handed the vetted address.
    proxy: str | None = None
    proxy_auth_env: str | None = None
    # Filled at load time from proxy_auth_env.
    proxy_auth: SecretStr | None = None


class CacheConfig(_Strict):
    enabled: bool = True
    # shared: identical edits from any client share one entry; client: per client key.
    scope: Literal["shared", "client"] = "shared"
    ttl_seconds: int = Field(24 * 3600, gt=0)
    # Per public model name, overriding ttl_seconds.
    model_ttl_seconds: dict[str, int] = Field(default_factory=dict)
    max_entry_bytes: ByteSize = ByteSize(32 * 1024 * 1024)
    # The in-process LRU used when no Redis is configured (single replica only).
    embedded_max_bytes: ByteSize = ByteSize(256 * 1024 * 1024)
    # Redis is an optimisation: past this timeout a request goes on uncached.
    redis_timeout_seconds: float = Field(0.25, gt=0)
    # After a Redis failure, skip Redis this long before trying again (no timeout per request).
    redis_retry_after_seconds: float = Field(1.0, ge=0)
    # Single-flight: the request paying upstream for an edit holds a lease on it for this long
    # (at most the call's own deadline), renewed every third of it while the call runs and given
    # back when it ends. Identical requests wait while the lease is held; a leader that died
    # frees the edit within this long.
    lease_seconds: float = Field(30.0, gt=0)
    # The most an identical request waits for the one in flight before paying for its own call
    # (it also stops when the lease is gone, or its client leaves or times out).
    single_flight_wait_seconds: float = Field(330.0, gt=0)
    # GET /v1/images/files/... is public by default (ids are unguessable); true requires a key.
    files_require_auth: bool = False
    fetch: FetchConfig = FetchConfig()


class FileConfig(_Strict):
    """The shape of gateway.yaml."""

    catalog: str = "models.yaml"
    default_model: str = "gpt-image-1.5"
    allow_anonymous: bool = False
    redis_url: str | None = None
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    limits: Limits = Limits()
    http: HttpClientConfig = HttpClientConfig()
    metrics: MetricsConfig = MetricsConfig()
    logging: LoggingConfig = LoggingConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    # Base of the image URLs the gateway hands out; null derives it from each request's own URL.
    public_base_url: str | None = None
    cache: CacheConfig = CacheConfig()
    clients: ClientsConfig = ClientsConfig()
    image_urls: ImageUrlConfig = ImageUrlConfig()
    pool: PoolConfig = PoolConfig()
    retry: RetryConfig = RetryConfig()


class Settings(_Strict):
    config_path: Path
    demo: bool
    default_model: str
    allow_anonymous: bool
    client_keys: tuple[SecretStr, ...]
    # Keys for /admin/*; with none, the admin endpoints do not exist (404).
    admin_keys: tuple[SecretStr, ...]
    redis_url: SecretStr | None
    upstreams: dict[str, UpstreamConfig]
    limits: Limits
    http: HttpClientConfig
    catalog: Catalog
    metrics: MetricsConfig = MetricsConfig()
    metrics_token: SecretStr | None = None
    # Set (by `image-gateway serve --workers N`) when worker processes share their metrics.
    metrics_multiprocess_dir: str | None = None
    logging: LoggingConfig = LoggingConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    public_base_url: str | None = None
    cache: CacheConfig = CacheConfig()
    # Named clients with their keys read from the environment (see app/clients/config.py).
    clients: ClientsConfig = ClientsConfig()
    image_urls: ImageUrlConfig = ImageUrlConfig()
    pool: PoolConfig = PoolConfig()
    retry: RetryConfig = RetryConfig()
    # The environment's HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY (either case), read once
    # at startup (app/upstream/egress.py); values may carry proxy credentials.
    proxy_environment: dict[str, SecretStr] = Field(default_factory=dict)


def _env_list(value: str | None) -> tuple[SecretStr, ...]:
    if not value:
        return ()
    return tuple(SecretStr(item.strip()) for item in value.split(",") if item.strip())


def _env_bool(name: str, value: str | None) -> bool:
    if value is None or value == "":
        return False
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"environment: {name}: expected true or false, got {value!r}")


def _pool_config(pool: PoolConfig, namespace: str | None) -> PoolConfig:
    if not namespace:
        return pool
    try:
        return PoolConfig.model_validate({**pool.model_dump(), "namespace": namespace})
    except ValidationError as exc:
        raise ConfigError(
            format_validation_error("environment: GATEWAY_POOL_NAMESPACE", exc)
        ) from None


def _refuse_secrets_in_file(source: str, raw: dict[str, object]) -> None:
    image_urls = raw.get("image_urls")
    if isinstance(image_urls, dict) and "proxy_auth" in image_urls:
        raise ConfigError(
            f"{source}: image_urls.proxy_auth: credentials never go in this file; name the "
            "environment variable holding user:password with proxy_auth_env"
        )
    upstreams = raw.get("upstreams")
    if not isinstance(upstreams, dict):
        return
    for name, body in upstreams.items():
        for field in ("keys", "key_specs"):
            if isinstance(body, dict) and field in body:
                raise ConfigError(
                    f"{source}: upstreams.{name}.{field}: keys never go in this file; name the "
                    "environment variable holding them with keys_env or named_keys"
                )
        if isinstance(body, dict) and "proxy_auth" in body:
            raise ConfigError(
                f"{source}: upstreams.{name}.proxy_auth: credentials never go in this file; name "
                "the environment variable holding user:password with proxy_auth_env"
            )


def _proxy_auth(
    source: str, key: str, proxy: str | None, auth_env: str | None, env: Mapping[str, str]
) -> SecretStr | None:
    """The credentials of a configured proxy, from the variable its proxy_auth_env names; the
    proxy URL itself is checked here too (a YAML file never carries credentials)."""
    if proxy is not None:
        try:
            parsed = Proxy.parse(proxy)
        except ProxyUrlError as exc:
            raise ConfigError(f"{source}: {key}.proxy: {exc}") from None
        if parsed.credentials is not None:
            raise ConfigError(
                f"{source}: {key}.proxy: credentials never go in this file; put user:password "
                "in an environment variable and name it with proxy_auth_env"
            )
    if auth_env is None:
        return None
    if proxy is None:
        raise ConfigError(f"{source}: {key}.proxy_auth_env: set, but {key}.proxy is not")
    value = (env.get(auth_env) or "").strip()
    if not value:
        raise ConfigError(
            f"environment: {auth_env}: the credentials of {key}.proxy are not set; set it to "
            "user:password"
        )
    return SecretStr(value)


def _proxy_environment(env: Mapping[str, str]) -> dict[str, SecretStr]:
    values = {name: env[name] for name in PROXY_VARIABLES if name in env}
    try:
        Egress.from_environment(values)
    except ProxyUrlError as exc:
        raise ConfigError(f"environment: {exc}") from None
    return {name: SecretStr(value) for name, value in values.items()}


def _key_specs(
    upstream_name: str, upstream: UpstreamConfig, env: Mapping[str, str], keys_env: str | None
) -> tuple[KeySpec, ...]:
    limits = upstream.key_limits
    specs = [
        KeySpec(
            id=f"{upstream_name}#{index}",
            secret=secret,
            max_concurrency=limits.max_concurrency,
            rpm=limits.rpm,
        )
        for index, secret in enumerate(_env_list(env.get(keys_env) if keys_env else None), 1)
    ]
    for named in upstream.named_keys:
        value = (env.get(named.env) or "").strip()
        if not value:
            raise ConfigError(
                f"environment: {named.env}: upstream {upstream_name!r} key {named.name!r} "
                "is not set"
            )
        specs.append(
            KeySpec(
                id=named.name,
                secret=SecretStr(value),
                max_concurrency=named.max_concurrency,
                rpm=named.rpm,
            )
        )
    ids = [spec.id for spec in specs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"upstreams.{upstream_name}.named_keys: key names must be unique")
    return tuple(specs)


def load_settings(env: Mapping[str, str] | None = None, *, demo: bool | None = None) -> Settings:
    """Read gateway.yaml and the catalog, apply GATEWAY_* overrides, and validate the result."""
    env = os.environ if env is None else env
    config_path = Path(env.get("GATEWAY_CONFIG") or DEFAULT_CONFIG_PATH)
    raw = read_yaml(config_path)
    _refuse_secrets_in_file(str(config_path), raw)
    try:
        file_config = FileConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(str(config_path), exc)) from None

    demo = _env_bool("GATEWAY_DEMO", env.get("GATEWAY_DEMO")) if demo is None else demo
    upstreams = dict(file_config.upstreams)
    default = upstreams.get(DEFAULT_UPSTREAM, UpstreamConfig(keys_env="GATEWAY_UPSTREAM_KEYS"))
    if env.get("GATEWAY_UPSTREAM_URL"):
        default = default.model_copy(update={"base_url": env["GATEWAY_UPSTREAM_URL"]})
    upstreams[DEFAULT_UPSTREAM] = default
    resolved: dict[str, UpstreamConfig] = {}
    for name, upstream in upstreams.items():
        keys_env = upstream.keys_env or (
            "GATEWAY_UPSTREAM_KEYS" if name == DEFAULT_UPSTREAM else None
        )
        specs = _key_specs(name, upstream, env, keys_env)
        proxy_auth = _proxy_auth(
            str(config_path), f"upstreams.{name}", upstream.proxy, upstream.proxy_auth_env, env
        )
        resolved[name] = upstream.model_copy(
            update={
                "keys": tuple(spec.secret for spec in specs),
                "keys_env": keys_env,
                "key_specs": specs,
                "proxy_auth": proxy_auth,
            }
        )

    catalog_path = config_path.parent / file_config.catalog
    catalog = load_catalog(catalog_path, known_upstreams=set(resolved))
    allow_anonymous = file_config.allow_anonymous or _env_bool(
        "GATEWAY_ALLOW_ANONYMOUS", env.get("GATEWAY_ALLOW_ANONYMOUS")
    )
    client_keys = _env_list(env.get("GATEWAY_CLIENT_KEYS"))
    # The demo runs without keys so a newcomer needs nothing; configured keys still apply.
    allow_anonymous = allow_anonymous or (demo and not client_keys)
    redis_url = env.get("GATEWAY_REDIS_URL") or file_config.redis_url
    if redis_url:
        try:
            RedisTarget.parse(redis_url)
        except RedisUrlError as exc:
            raise ConfigError(f"GATEWAY_REDIS_URL: {exc}") from None
    metrics = file_config.metrics
    if env.get("GATEWAY_METRICS_PUBLIC"):
        public = _env_bool("GATEWAY_METRICS_PUBLIC", env.get("GATEWAY_METRICS_PUBLIC"))
        metrics = metrics.model_copy(update={"public": public})
    metrics_token = env.get("GATEWAY_METRICS_TOKEN")
    cache = file_config.cache
    if env.get("GATEWAY_CACHE_ENABLED"):
        enabled = _env_bool("GATEWAY_CACHE_ENABLED", env["GATEWAY_CACHE_ENABLED"])
        cache = cache.model_copy(update={"enabled": enabled})
    public_base_url = env.get("GATEWAY_PUBLIC_BASE_URL") or file_config.public_base_url
    image_urls = file_config.image_urls
    if env.get("GATEWAY_IMAGE_URLS_ENABLED"):
        enabled = _env_bool("GATEWAY_IMAGE_URLS_ENABLED", env["GATEWAY_IMAGE_URLS_ENABLED"])
        image_urls = image_urls.model_copy(update={"enabled": enabled})
    image_urls = image_urls.model_copy(
        update={
            "proxy_auth": _proxy_auth(
                str(config_path), "image_urls", image_urls.proxy, image_urls.proxy_auth_env, env
            )
        }
    )
    settings = Settings(
        config_path=config_path,
        demo=demo,
        default_model=file_config.default_model,
        allow_anonymous=allow_anonymous,
        client_keys=client_keys,
        admin_keys=_env_list(env.get("GATEWAY_ADMIN_KEYS")),
        redis_url=SecretStr(redis_url) if redis_url else None,
        upstreams=resolved,
        limits=file_config.limits,
        http=file_config.http,
        catalog=catalog,
        metrics=metrics,
        metrics_token=SecretStr(metrics_token) if metrics_token else None,
        metrics_multiprocess_dir=env.get("PROMETHEUS_MULTIPROC_DIR") or None,
        logging=file_config.logging,
        shutdown=file_config.shutdown,
        public_base_url=public_base_url.rstrip("/") if public_base_url else None,
        cache=cache,
        clients=_with_client_keys(file_config.clients, env),
        image_urls=image_urls,
        pool=_pool_config(file_config.pool, env.get("GATEWAY_POOL_NAMESPACE")),
        retry=file_config.retry,
        proxy_environment=_proxy_environment(env),
    )
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    source = str(settings.config_path)
    if settings.default_model not in settings.catalog.models:
        raise ConfigError(
            f"{source}: default_model: {settings.default_model!r} is not in the catalog"
        )
    _check_clients(settings)
    if not settings.client_keys and not settings.clients.named and not settings.allow_anonymous:
        raise ConfigError(
            "environment: GATEWAY_CLIENT_KEYS: no client keys configured; set it, declare "
            "clients under `clients.named`, or set GATEWAY_ALLOW_ANONYMOUS=true to serve "
            "without client authentication"
        )
    for name in settings.cache.model_ttl_seconds:
        if name not in settings.catalog.models:
            raise ConfigError(f"{source}: cache.model_ttl_seconds: {name!r} is not in the catalog")
    if settings.public_base_url is not None and not settings.public_base_url.startswith(
        ("http://", "https://")
    ):
        raise ConfigError(
            f"{source}: public_base_url: expected an http(s) URL, got {settings.public_base_url!r}"
        )
    if settings.demo:
        return
    for name in settings.catalog.upstreams_in_use():
        upstream = settings.upstreams[name]
        if upstream.type == "demo":
            continue
        if not upstream.base_url.startswith(("http://", "https://")):
            hint = " (or GATEWAY_UPSTREAM_URL)" if name == DEFAULT_UPSTREAM else ""
            raise ConfigError(
                f"{source}: upstreams.{name}.base_url: expected an http(s) URL{hint}, "
                f"got {upstream.base_url!r}"
            )
        if upstream.type == "bfl":
            _check_bfl_models(settings, name)
        if not upstream.keys:
            raise ConfigError(
                f"environment: {upstream.keys_env or '(no keys_env)'}: upstream {name!r} "
                "has no keys; set the variable to a comma-separated list of API keys"
            )


# What BFL's Kontext endpoints take at most; rules beyond these would fail only once paid for.
BFL_MAX_IMAGES = 4


def _check_bfl_models(settings: Settings, upstream: str) -> None:
    source = "catalog"
    for model in settings.catalog.models.values():
        if upstream not in model.upstreams:
            continue
        if model.mask.allowed:
            raise ConfigError(
                f"{source}: models.{model.name}.mask.allowed: must be false, the bfl upstream "
                f"{upstream!r} takes no mask"
            )
        if model.images.max_count > BFL_MAX_IMAGES:
            raise ConfigError(
                f"{source}: models.{model.name}.images.max_count: at most {BFL_MAX_IMAGES} for "
                f"the bfl upstream {upstream!r}"
            )


def _with_client_keys(clients: ClientsConfig, env: Mapping[str, str]) -> ClientsConfig:
    named = {}
    for name, client in clients.named.items():
        if client.keys_env:
            keys = _env_list(env.get(client.keys_env))
            # A variable named but empty is a deployment slip, not a wish for no keys.
            if not keys:
                raise ConfigError(
                    f"environment: {client.keys_env}: client {name!r} takes its keys from this "
                    "variable, but it is empty; set it to a comma-separated list of keys"
                )
            client = client.model_copy(update={"keys": keys})
        named[name] = client
    return clients.model_copy(update={"named": named})


def _check_clients(settings: Settings) -> None:
    source = str(settings.config_path)
    clients = settings.clients
    for name, client in clients.named.items():
        for model in client.models or ():
            if model not in settings.catalog.models:
                raise ConfigError(
                    f"{source}: clients.named.{name}.models: {model!r} is not in the catalog"
                )
    limited = clients.default_limits.any_set() or any(
        client.limits.any_set() for client in clients.named.values()
    )
    # Limits held per process would multiply with every replica: they need the shared store.
    if limited and settings.redis_url is None:
        raise ConfigError(
            f"{source}: clients: limits are set but no Redis is configured; set redis_url "
            "(or GATEWAY_REDIS_URL) so that every replica counts against the same limits"
        )
