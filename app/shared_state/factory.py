"""Where the shared Redis lives, read from GATEWAY_REDIS_URL, and the one factory that connects.

  redis://[user:password@]host:port/db              one server
  rediss://...                                      the same over TLS
  redis+sentinel://[user:password@]h1:26379,h2:26379/service/db
                                                    the primary Sentinel names `service`, found
                                                    again after every failover
  redis+cluster://[user:password@]h1:6379,h2:6379   Redis Cluster (db 0 only); any reachable
                                                    nodes, the rest are discovered
  rediss+sentinel://, rediss+cluster://             the same over TLS
The password in the URL is for the data nodes; Sentinels with their own password take
`?sentinel_password=...`. TLS options: `?ssl_ca_certs=/path&ssl_cert_reqs=required|optional|none`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, cast
from urllib.parse import parse_qsl, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

Mode = Literal["single", "sentinel", "cluster"]

_SCHEMES: dict[str, tuple[Mode, bool]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "unix": ("single", False),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")
_DEFAULT_PORTS: dict[Mode, int] = {"single": 6379, "sentinel": 26379, "cluster": 6379}


class RedisUrlError(ValueError):
    """GATEWAY_REDIS_URL cannot be used. The message never repeats the URL (it may hold a
    password)."""


@dataclass(frozen=True)
class RedisTarget:
    mode: Mode
    url: str = field(repr=False)
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service: str | None = None
    db: int = 0
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)
    tls_options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in _SCHEMES:
            known = ", ".join(f"{name}://" for name in _SCHEMES)
            raise RedisUrlError(f"redis url: unknown scheme; use one of {known}")
        mode, tls = _SCHEMES[scheme.lower()]
        if mode == "single":
            # redis-py reads these itself, with every query option it knows.
            return cls(mode=mode, url=url, tls=tls)
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        userinfo, at, hosts = netloc.rpartition("@")
        username = password = None
        if at:
            user, colon, secret = userinfo.partition(":")
            username = unquote(user) or None
            password = unquote(secret) if colon else None
        nodes = tuple(_node(item, _DEFAULT_PORTS[mode]) for item in hosts.split(",") if item)
        if not nodes:
            raise RedisUrlError(f"redis url: {scheme}:// needs at least one host:port")
        segments = [unquote(part) for part in path.split("/") if part]
        service = None
        if mode == "sentinel":
            if not segments:
                raise RedisUrlError(
                    "redis url: a Sentinel URL names its service: redis+sentinel://h:26379/name/0"
                )
            service = segments.pop(0)
        if len(segments) > 1:
            raise RedisUrlError("redis url: too many path segments")
        db = _db(segments[0]) if segments else 0
        if mode == "cluster" and db != 0:
            raise RedisUrlError("redis url: Redis Cluster has database 0 only")
        options = dict(parse_qsl(query))
        sentinel_password = options.pop("sentinel_password", None)
        unknown = sorted(set(options) - set(_TLS_OPTIONS))
        if unknown:
            raise RedisUrlError(f"redis url: unknown options {unknown}")
        return cls(
            mode=mode,
            url=url,
            tls=tls,
            nodes=nodes,
            service=service,
            db=db,
            username=username,
            password=password,
            sentinel_password=sentinel_password,
            tls_options=tuple(sorted(options.items())),
        )


def open_redis(
    target: RedisTarget | str,
    *,
    timeout: float,
    connect_timeout: float | None = None,
    resend_on_closed_connection: bool = False,
) -> aioredis.Redis:
    """A client for the target; nothing connects until the first command.

    Every caller gets the same command surface: a Cluster client routes each command (and each
    Lua script, by its declared keys) to the node owning the slot; a Sentinel client asks the
    Sentinels for the primary whenever it (re)connects, so it follows failovers by itself.

    `resend_on_closed_connection`: a command whose pooled connection turns out closed (the
    server restarted since it was last used) is sent once more on a new connection, by redis-py.
    Without it, after a restart every pooled connection fails one command before it reconnects.
    Only for callers whose every command may run twice (the cache's); a Cluster client already
    retries connection errors itself, after refreshing its slot map.
    """
    if isinstance(target, str):
        target = RedisTarget.parse(target)
    timeouts: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": connect_timeout if connect_timeout is not None else timeout,
    }
    resend: dict[str, Any] = {}
    if resend_on_closed_connection:
        resend = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
    if target.mode == "single":
        return aioredis.from_url(target.url, **timeouts, **resend)
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, **dict(target.tls_options)}
    credentials: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.mode == "cluster":
        cluster = _RoutedCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            # A MOVED updates that one slot. By default every 5th MOVED resets the whole client,
            # closing connections that other commands are reading answers from; redis-py then
            # sends those commands again, and an INCR or a compare-and-set lands twice. A lost or
            # failed node still refreshes the whole slot map (connection errors, CLUSTERDOWN).
            reinitialize_steps=0,
            **credentials,
            **tls,
            **timeouts,
        )
        # RedisCluster is not a Redis subclass but serves every command the gateway sends
        # (commands, pipelines without transactions, scripts); the topology tests hold it to that.
        return cast(aioredis.Redis, cluster)
    sentinel_kwargs: dict[str, Any] = {**timeouts, **tls}
    if target.sentinel_password is not None:
        sentinel_kwargs["password"] = target.sentinel_password
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    assert target.service is not None
    primary: aioredis.Redis = sentinel.master_for(
        target.service,
        redis_class=_SentinelPrimary,
        db=target.db,
        **credentials,
        **tls,
        **timeouts,
        **resend,
    )
    return primary


class _RoutedCluster(RedisCluster):
    """A Cluster client that knows the slot map before it routes, and reports a connection that
    a topology refresh closed under it as a ConnectionError (see execute_command)."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        # redis-py 8.1 picks a command's node before it (re)reads the slot map: while the map is
        # unknown (first use, or after a CLUSTERDOWN reset) a keyed command goes to a random
        # primary and draws MOVED, and with 40 at once those MOVEDs reset the client, closing
        # connections other tasks are using. initialize() is one flag check once the map is
        # known, and concurrent callers wait on one refresh.
        await self.initialize()
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            if not _closed_under_us(exc):
                raise
        # A reset that other commands' errors still trigger can close this command's connection
        # between redis-py's is-connected check and its write: nothing was sent, so once more.
        await self.initialize()
        try:
            return await super().execute_command(*args, **kwargs)
        except AttributeError as exc:
            if not _closed_under_us(exc):
                raise
            raise RedisConnectionError(_CLOSED_UNDER_US) from exc

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if transaction or shard_hint:
            return super().pipeline(transaction, shard_hint)
        # redis-py's stubs declare an attribute abstract that its __init__ sets.
        return _ClusterPipeline(self)  # type: ignore[abstract]


class _ClusterPipeline(ClusterPipeline):
    """A pipeline without a transaction, as the gateway sends them."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        # Part of a pipeline may have run on other nodes, so it is not sent again; callers get a
        # RedisError, which they already treat as "Redis unavailable" and fail open on.
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except AttributeError as exc:
            if not _closed_under_us(exc):
                raise
            raise RedisConnectionError(_CLOSED_UNDER_US) from exc


_CLOSED_UNDER_US = "redis cluster: connection closed by a topology refresh"


def _closed_under_us(exc: AttributeError) -> bool:
    """redis-py's write to a connection whose socket another task has just closed."""
    return exc.obj is None and exc.name in {"writelines", "drain"}


class _SentinelPrimary(aioredis.Redis):
    """The primary's client; closing it also closes the connections to the Sentinels."""

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        manager = getattr(self.connection_pool, "sentinel_manager", None)
        if isinstance(manager, Sentinel):
            await manager.aclose()


def _node(item: str, default_port: int) -> tuple[str, int]:
    host, port = item, ""
    if item.startswith("["):
        host, _, tail = item[1:].partition("]")
        port = tail.removeprefix(":")
    elif ":" in item:
        host, _, port = item.rpartition(":")
    if not host:
        raise RedisUrlError("redis url: a host is empty")
    if not port:
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise RedisUrlError("redis url: a port is not a number between 1 and 65535")
    return host, int(port)


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError("redis url: the database must be a number")
    return int(text)
