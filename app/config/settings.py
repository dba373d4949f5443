"""Settings: one pydantic-settings class, read from the environment over config/gateway.yaml.

Sources, highest first: values passed in (`--demo`), GATEWAY_* variables, the YAML file, the
field defaults. Secrets only ever come from the environment (an upstream or client names the
variable holding its keys), so committed YAML never holds a key. This module is the only reader
of the process environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from app.config.catalog import Catalog, load_catalog
from app.config.tenants import ClientsConfig
from app.config.yaml_source import ConfigError, YamlFileSource, find_paths, format_validation_error
from app.shared_state.factory import RedisTarget, RedisUrlError
from app.upstream.bfl import check_catalog as check_bfl_catalog
from app.upstream.egress import PROXY_VARIABLES, Egress, Proxy, ProxyUrlError
from app.upstream.gemini import check_catalog as check_gemini_catalog

DEFAULT_CONFIG_PATH = "config/gateway.yaml"
DEFAULT_UPSTREAM = "default"
# The default upstream's keys when its keys_env names no other variable.
DEFAULT_UPSTREAM_KEYS = "GATEWAY_UPSTREAM_KEYS"
ENV_PREFIX = "GATEWAY_"
NESTED_DELIMITER = "__"
# Written by `image-gateway serve --workers N` (prometheus-client's own variable).
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


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


class AzureSettings(_Strict):
    """How an Azure OpenAI upstream addresses its deployments (app/upstream/azure.py)."""

    # deployments: {base_url}/openai/deployments/{deployment}/images/edits?api-version=...
    # v1: {base_url}/openai/v1/images/edits, the deployment named in the body's `model`.
    api_form: Literal["deployments", "v1"] = "deployments"
    # null: 2025-04-01-preview for the deployments form, none for v1 (Azure's v1 API needs none).
    api_version: str | None = Field(None, pattern=r"^[A-Za-z0-9.-]{1,40}$")
    # Public model name -> the Azure deployment serving it; a model not listed here is served by
    # the deployment named like its upstream_model.
    deployments: dict[str, str] = Field(default_factory=dict)


class GeminiSettings(_Strict):
    """How a Google Gemini upstream is called (app/upstream/gemini.py)."""

    # {base_url}/{api_version}/models/{model}:generateContent
    api_version: str = Field("v1beta", pattern=r"^v[0-9a-z]{1,20}$")
    # What the answer may hold; Gemini's own default is text and image (the text is dropped).
    response_modalities: tuple[Literal["TEXT", "IMAGE"], ...] = Field(
        ("TEXT", "IMAGE"), min_length=1
    )
    # One call makes one image, so n > 1 is n calls, at most this many at once.
    max_parallel_calls: int = Field(4, ge=1, le=16)

    @field_validator("response_modalities")
    @classmethod
    def _asks_for_images(cls, modalities: tuple[str, ...]) -> tuple[str, ...]:
        if "IMAGE" not in modalities:
            raise ValueError("must include IMAGE: an answer without one is refused")
        return modalities


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
    type: Literal["openai", "demo", "bfl", "azure", "gemini"] = "openai"
    base_url: str = ""
    keys_env: str | None = None
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    keys: tuple[SecretStr, ...] = ()
    bfl: BflSettings = BflSettings()
    azure: AzureSettings = AzureSettings()
    gemini: GeminiSettings = GeminiSettings()
    # Routing (app/routing/forwarder.py): the lowest priority number is tried first; within a
    # tier a model's upstreams are tried in its list order (a fallback), unless one of them sets
    # a weight: then the tier's traffic is split by weight (unset counts as 1).
    priority: int = Field(0, ge=0)
    weight: int | None = Field(None, ge=1)
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
    """How many times one client request may be tried upstream (see app/routing/forwarder.py)."""

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
    # kernel (glibc only; 0 keeps malloc's defaults). See app/server/heap.py.
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
    # answered 503 gateway_shutdown (app/server/drain.py), and the process exits.
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


# Flat names earlier releases documented for nested keys. Each stays an override of its key; the
# generic spelling (GATEWAY_CACHE__ENABLED) works too, and setting both is refused as ambiguous.
FLAT_VARIABLES: dict[str, tuple[str, ...]] = {
    "GATEWAY_UPSTREAM_URL": ("upstreams", DEFAULT_UPSTREAM, "base_url"),
    "GATEWAY_CACHE_ENABLED": ("cache", "enabled"),
    "GATEWAY_METRICS_PUBLIC": ("metrics", "public"),
    "GATEWAY_IMAGE_URLS_ENABLED": ("image_urls", "enabled"),
    "GATEWAY_POOL_NAMESPACE": ("pool", "namespace"),
}

# Fields filled at load time from the variables the config names (`*` is any name): no source
# may set them, so a secret can never reach them except through its named variable.
_KEYS_HINT = "name the environment variable holding them with keys_env or named_keys"
_PROXY_AUTH_HINT = "name the environment variable holding user:password with proxy_auth_env"
READ_FROM_NAMED_VARIABLES: dict[tuple[str, ...], tuple[str, str]] = {
    ("upstreams", "*", "keys"): ("keys", _KEYS_HINT),
    ("upstreams", "*", "key_specs"): ("keys", _KEYS_HINT),
    ("upstreams", "*", "proxy_auth"): ("credentials", _PROXY_AUTH_HINT),
    ("image_urls", "proxy_auth"): ("credentials", _PROXY_AUTH_HINT),
    ("clients", "named", "*", "keys"): (
        "keys",
        "name the environment variable holding them with keys_env, or give their SHA-256 with "
        "key_sha256",
    ),
}
# Top-level fields only the environment (or `--demo`) sets, and why not the file.
NOT_IN_FILE: dict[tuple[str, ...], str] = {
    ("client_keys",): "keys never go in this file; set GATEWAY_CLIENT_KEYS",
    ("admin_keys",): "keys never go in this file; set GATEWAY_ADMIN_KEYS",
    ("metrics_token",): "tokens never go in this file; set GATEWAY_METRICS_TOKEN",
    ("config",): "not a key of this file; GATEWAY_CONFIG names the file",
    ("demo",): "not a key of this file; set GATEWAY_DEMO or pass --demo",
    ("environment",): "not a key of this file",
    **{
        path: f"{what} never go in this file; {hint}"
        for path, (what, hint) in READ_FROM_NAMED_VARIABLES.items()
    },
}


class Settings(BaseSettings):
    """Every setting, declared once. Field order matters: a validator sees the fields above it
    (`environment` first, so that the variables the file names can be read)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        # An empty variable is unset (docker-compose passes `${X:-}` through as "").
        env_ignore_empty=True,
        extra="forbid",
        frozen=True,
    )

    # The environment the settings are read from: the process's own, or a mapping handed in
    # (`Settings(environment=...)`, a test's seam). Never from a variable or the file; NoDecode
    # keeps an unrelated GATEWAY_ENVIRONMENT=production from being parsed as JSON.
    environment: Annotated[dict[str, SecretStr], NoDecode] = Field(
        default_factory=dict, repr=False, exclude=True
    )
    # GATEWAY_CONFIG: the YAML file these settings were read from.
    config: Path = Path(DEFAULT_CONFIG_PATH)
    demo: bool = False
    client_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    # Keys for /admin/*; with none, the admin endpoints do not exist (404).
    admin_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    # In the file, the catalog's path (relative to the file); loaded here.
    catalog: Catalog = Field("models.yaml", validate_default=True)
    default_model: str = "gpt-image-1.5"
    allow_anonymous: bool = False
    # The state Redis: usage, runtime client keys, limits and quotas, key health. State must not
    # be evicted (docs/operations.md#state-and-persistence).
    redis_url: SecretStr | None = None
    # The cache's own Redis (entries, hosted files, single-flight leases), which may evict;
    # unset: the cache shares the state Redis.
    cache_redis_url: SecretStr | None = None
    limits: Limits = Limits()
    http: HttpClientConfig = HttpClientConfig()
    metrics: MetricsConfig = MetricsConfig()
    metrics_token: SecretStr | None = None
    logging: LoggingConfig = LoggingConfig()
    shutdown: ShutdownConfig = ShutdownConfig()
    # Base of the image URLs the gateway hands out; null derives it from each request's own URL.
    public_base_url: str | None = None
    cache: CacheConfig = CacheConfig()
    # Named clients with their keys read from the environment (see app/config/tenants.py).
    clients: ClientsConfig = ClientsConfig()
    image_urls: ImageUrlConfig = ImageUrlConfig()
    pool: PoolConfig = PoolConfig()
    retry: RetryConfig = RetryConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Values passed in, then the environment (the `environment=` passed in, else the
        process's own), then gateway.yaml at GATEWAY_CONFIG. No .env file, no secrets directory."""
        given = init_settings.init_kwargs if isinstance(init_settings, InitSettingsSource) else {}
        environ = given.get("environment")
        return (
            init_settings,
            GatewayEnvironment(settings_cls, os.environ if environ is None else environ),
            YamlFileSource(
                settings_cls,
                path_field="config",
                default=Path(DEFAULT_CONFIG_PATH),
                refused=NOT_IN_FILE,
            ),
        )

    @property
    def proxy_environment(self) -> dict[str, SecretStr]:
        """HTTPS_PROXY, HTTP_PROXY, ALL_PROXY and NO_PROXY (either case) as the environment has
        them (app/upstream/egress.py reads them); values may carry proxy credentials."""
        return {
            name: self.environment[name] for name in PROXY_VARIABLES if name in self.environment
        }

    @property
    def metrics_multiprocess_dir(self) -> str | None:
        """Set (by `image-gateway serve --workers N`) when worker processes share their metrics."""
        value = self.environment.get(MULTIPROC_VARIABLE)
        if value is None:
            return None
        return value.get_secret_value() or None

    @field_validator("client_keys", "admin_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("upstreams")
    @classmethod
    def _upstream_keys_and_proxies(
        cls, upstreams: dict[str, UpstreamConfig], info: ValidationInfo
    ) -> dict[str, UpstreamConfig]:
        """The `default` upstream always exists; keys and proxy credentials come from the
        variables each upstream names."""
        environment: dict[str, SecretStr] = info.data.get("environment", {})
        source = str(info.data.get("config", DEFAULT_CONFIG_PATH))
        if DEFAULT_UPSTREAM not in upstreams:
            upstreams = {**upstreams, DEFAULT_UPSTREAM: UpstreamConfig()}
        resolved: dict[str, UpstreamConfig] = {}
        for name, upstream in upstreams.items():
            keys_env = upstream.keys_env or (
                DEFAULT_UPSTREAM_KEYS if name == DEFAULT_UPSTREAM else None
            )
            specs = _key_specs(name, upstream, environment, keys_env)
            proxy_auth = _proxy_auth(
                source, f"upstreams.{name}", upstream.proxy, upstream.proxy_auth_env, environment
            )
            resolved[name] = upstream.model_copy(
                update={
                    "keys": tuple(spec.secret for spec in specs),
                    "keys_env": keys_env,
                    "key_specs": specs,
                    "proxy_auth": proxy_auth,
                }
            )
        return resolved

    @field_validator("catalog", mode="before")
    @classmethod
    def _load_catalog(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str | Path):
            return value
        if "upstreams" not in info.data:
            raise ValueError("not read while `upstreams` has errors")
        config = Path(info.data.get("config", DEFAULT_CONFIG_PATH))
        return load_catalog(config.parent / value, known_upstreams=set(info.data["upstreams"]))

    @field_validator("allow_anonymous")
    @classmethod
    def _demo_serves_anyone(cls, allow: bool, info: ValidationInfo) -> bool:
        # The demo runs without keys so a newcomer needs nothing; configured keys still apply.
        return allow or bool(info.data.get("demo") and not info.data.get("client_keys"))

    @field_validator("redis_url", "cache_redis_url")
    @classmethod
    def _redis_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is not None:
            try:
                RedisTarget.parse(url.get_secret_value())
            except RedisUrlError as exc:
                raise ValueError(str(exc)) from None
        return url

    @field_validator("public_base_url")
    @classmethod
    def _public_base_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL, got {url!r}")
        return url.rstrip("/")

    @field_validator("clients")
    @classmethod
    def _client_keys_from_environment(
        cls, clients: ClientsConfig, info: ValidationInfo
    ) -> ClientsConfig:
        environment: dict[str, SecretStr] = info.data.get("environment", {})
        named = {}
        for name, client in clients.named.items():
            if client.keys_env:
                keys = _split(_variable(environment, client.keys_env))
                # A variable named but empty is a deployment slip, not a wish for no keys.
                if not keys:
                    raise ConfigError(
                        f"environment: {client.keys_env}: client {name!r} takes its keys from "
                        "this variable, but it is empty; set it to a comma-separated list of keys"
                    )
                client = client.model_copy(update={"keys": keys})
            named[name] = client
        return clients.model_copy(update={"named": named})

    @field_validator("image_urls")
    @classmethod
    def _image_url_proxy_credentials(
        cls, image_urls: ImageUrlConfig, info: ValidationInfo
    ) -> ImageUrlConfig:
        source = str(info.data.get("config", DEFAULT_CONFIG_PATH))
        proxy_auth = _proxy_auth(
            source,
            "image_urls",
            image_urls.proxy,
            image_urls.proxy_auth_env,
            info.data.get("environment", {}),
        )
        return image_urls.model_copy(update={"proxy_auth": proxy_auth})

    @model_validator(mode="after")
    def _models_in_the_catalog(self) -> Self:
        source = str(self.config)
        if self.default_model not in self.catalog.models:
            raise ConfigError(
                f"{source}: default_model: {self.default_model!r} is not in the catalog"
            )
        for name in self.cache.model_ttl_seconds:
            if name not in self.catalog.models:
                raise ConfigError(
                    f"{source}: cache.model_ttl_seconds: {name!r} is not in the catalog"
                )
        for name, client in self.clients.named.items():
            for model in client.models or ():
                if model not in self.catalog.models:
                    raise ConfigError(
                        f"{source}: clients.named.{name}.models: {model!r} is not in the catalog"
                    )
        return self

    @model_validator(mode="after")
    def _clients_can_be_served(self) -> Self:
        clients = self.clients
        limited = (
            clients.default_limits.any_set()
            or any(client.limits.any_set() for client in clients.named.values())
            or any(team.has_budget() for team in clients.teams.values())
        )
        # Limits held per process would multiply with every replica: they need the shared store.
        if limited and self.redis_url is None:
            raise ConfigError(
                f"{self.config}: clients: limits are set but no Redis is configured; set "
                "redis_url (or GATEWAY_REDIS_URL) so that every replica counts against the same "
                "limits"
            )
        if not self.client_keys and not clients.named and not self.allow_anonymous:
            raise ConfigError(
                "environment: GATEWAY_CLIENT_KEYS: no client keys configured; set it, declare "
                "clients under `clients.named`, or set GATEWAY_ALLOW_ANONYMOUS=true to serve "
                "without client authentication"
            )
        return self

    @model_validator(mode="after")
    def _teams_of_known_clients(self) -> Self:
        env_clients = {f"client-{number}" for number in range(1, len(self.client_keys) + 1)}
        known = env_clients | set(self.clients.named)
        seen: dict[str, str] = {}
        for team, body in self.clients.teams.items():
            for member in body.members:
                if member not in known:
                    raise ConfigError(
                        f"{self.config}: clients.teams.{team}.members: {member!r} is not a "
                        "client (members are clients.named names, or client-<n> for the "
                        "GATEWAY_CLIENT_KEYS ones)"
                    )
                if member in seen:
                    raise ConfigError(
                        f"{self.config}: clients.teams.{team}.members: {member!r} is already a "
                        f"member of team {seen[member]!r}; a client is in one team at most"
                    )
                seen[member] = team
        return self

    @model_validator(mode="after")
    def _upstreams_usable(self) -> Self:
        try:
            Egress.from_environment(
                {name: value.get_secret_value() for name, value in self.proxy_environment.items()}
            )
        except ProxyUrlError as exc:
            raise ConfigError(f"environment: {exc}") from None
        if self.demo:
            return self
        for name in self.catalog.upstreams_in_use():
            upstream = self.upstreams[name]
            if upstream.type == "demo":
                continue
            if not upstream.base_url.startswith(("http://", "https://")):
                hint = " (or GATEWAY_UPSTREAM_URL)" if name == DEFAULT_UPSTREAM else ""
                raise ConfigError(
                    f"{self.config}: upstreams.{name}.base_url: expected an http(s) URL{hint}, "
                    f"got {upstream.base_url!r}"
                )
            if upstream.type == "bfl":
                check_bfl_catalog(self.catalog, name)
            if upstream.type == "gemini":
                check_gemini_catalog(self.catalog, name)
            for model in upstream.azure.deployments:
                if model not in self.catalog.models:
                    raise ConfigError(
                        f"{self.config}: upstreams.{name}.azure.deployments: {model!r} is not "
                        "a model in the catalog"
                    )
            if not upstream.keys:
                raise ConfigError(
                    f"environment: {upstream.keys_env or '(no keys_env)'}: upstream {name!r} "
                    "has no keys; set the variable to a comma-separated list of API keys"
                )
        return self


def load_settings(env: Mapping[str, str] | None = None, *, demo: bool | None = None) -> Settings:
    """Read the environment (`env`, else the process's own) and gateway.yaml with its catalog,
    and validate the result. Raises ConfigError phrased `file: key: what is wrong`."""
    given: dict[str, Any] = {} if env is None else {"environment": env}
    if demo is not None:
        given["demo"] = demo
    try:
        return Settings(**given)
    except ValidationError as exc:
        # The sources again, to say which variable or which file set each value at fault.
        environment = GatewayEnvironment(Settings, os.environ if env is None else env)
        file = environment().get("config") or DEFAULT_CONFIG_PATH
        raise ConfigError(
            format_validation_error(str(file), exc, variable_for=environment.variable_for)
        ) from None


class GatewayEnvironment(EnvSettingsSource):
    """The environment source: GATEWAY_<FIELD> and GATEWAY_<SECTION>__<KEY> as pydantic-settings
    reads them, the flat names of FLAT_VARIABLES, and the whole mapping as `environment` for the
    variables the file names. Reads `environ`, not necessarily the process's own."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.environ = dict(environ)
        # The source's own reading of os.environ, replaced by the mapping it was handed.
        self.env_vars = parse_env_vars(
            self.environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )

    def prepare_field_value(
        self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool
    ) -> Any:
        try:
            return super().prepare_field_value(field_name, field, value, value_is_complex)
        except ValueError as exc:
            # Only JSON gets here (a section or list given whole); its error never echoes the value.
            name = (ENV_PREFIX + field_name).upper()
            raise ConfigError(
                f"environment: {name} (or {name}{NESTED_DELIMITER}...): not valid JSON: {exc}"
            ) from None

    def __call__(self) -> dict[str, Any]:
        values = super().__call__()
        for name, path in FLAT_VARIABLES.items():
            value = self.env_vars.get(name.lower())
            if value is None:
                continue
            generic = _generic_name(path)
            if generic.lower() in self.env_vars:
                raise ConfigError(f"environment: {name}: {generic} is set too; set one of them")
            _put(values, path, value)
        for pattern, (what, hint) in READ_FROM_NAMED_VARIABLES.items():
            for path in find_paths(values, pattern):
                raise ConfigError(
                    f"environment: {self.variable_for(path)}: {what} are only read from the "
                    f"variable the config names; {hint}"
                )
        values["environment"] = self.environ
        return values

    def variable_for(self, loc: tuple[int | str, ...]) -> str | None:
        """The variable that set the value at `loc` (or a section holding it), if one did."""
        key = tuple(str(part).lower() for part in loc)
        for name, path in FLAT_VARIABLES.items():
            if name.lower() in self.env_vars and key[: len(path)] == path:
                return name
        prefix = ENV_PREFIX.lower()
        for name in self.env_vars:
            if name.startswith(prefix):
                path = tuple(name[len(prefix) :].split(NESTED_DELIMITER))
                if key[: len(path)] == path:
                    return name.upper()
        return None


def _generic_name(path: tuple[str, ...]) -> str:
    return (ENV_PREFIX + NESTED_DELIMITER.join(path)).upper()


def _put(values: dict[str, Any], path: tuple[str, ...], value: str) -> None:
    *parents, last = path
    for part in parents:
        child = values.setdefault(part, {})
        if not isinstance(child, dict):
            return  # a section given whole and not as a mapping: validation names it
        values = child
    values[last] = value


def _variable(environment: Mapping[str, SecretStr], name: str) -> str:
    value = environment.get(name)
    return value.get_secret_value().strip() if value is not None else ""


def _split(value: str) -> tuple[SecretStr, ...]:
    return tuple(SecretStr(item.strip()) for item in value.split(",") if item.strip())


def _proxy_auth(
    source: str,
    key: str,
    proxy: str | None,
    auth_env: str | None,
    environment: Mapping[str, SecretStr],
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
    value = _variable(environment, auth_env)
    if not value:
        raise ConfigError(
            f"environment: {auth_env}: the credentials of {key}.proxy are not set; set it to "
            "user:password"
        )
    return SecretStr(value)


def _key_specs(
    upstream_name: str,
    upstream: UpstreamConfig,
    environment: Mapping[str, SecretStr],
    keys_env: str | None,
) -> tuple[KeySpec, ...]:
    limits = upstream.key_limits
    pooled = _split(_variable(environment, keys_env)) if keys_env else ()
    specs = [
        KeySpec(
            id=f"{upstream_name}#{index}",
            secret=secret,
            max_concurrency=limits.max_concurrency,
            rpm=limits.rpm,
        )
        for index, secret in enumerate(pooled, 1)
    ]
    for named in upstream.named_keys:
        value = _variable(environment, named.env)
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
