"""Whether the state Redis keeps what the gateway writes there: its persistence (AOF, RDB
snapshots) and eviction policy, read with CONFIG GET at startup and by the Redis watcher, and the
one warning when state could be lost on a restart or evicted under memory pressure.

Every state key but the runtime client keys has a TTL (usage records, quota counters, key
health), so a `volatile-*` policy evicts state as surely as an `allkeys-*` one: only
`noeviction` keeps it. Which nodes are asked: the server the client talks to (one server, or
the primary a Sentinel names, which the watcher asks again after a failover); under Redis
Cluster every primary, and the weakest answer is the one reported. Managed Redis often refuses
CONFIG: the answer is then "unknown", said once in the log, never an error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from app.shared_state.failures import CLUSTER_UNREACHABLE, REDIS_FAILURES, refused_command

log = logging.getLogger("gateway.redis")

Persistence = Literal["aof", "rdb", "none", "unknown"]

# Read one by one: CONFIG GET takes several names only from Redis 7 on.
_SETTINGS = ("appendonly", "save", "maxmemory-policy")
_SAFE_POLICY = "noeviction"
_CONFIG_REFUSED = "cannot read its configuration (CONFIG is refused there)"
_UNREACHABLE = "not checked: Redis did not answer"
_BUDGET_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Durability:
    """What the state Redis does with state: kept across a restart (`persistence`), evicted under
    memory pressure (`eviction_policy`), and the warning an operator should act on."""

    persistence: Persistence
    eviction_policy: str | None
    warning: str | None = None
    # Why persistence is unknown (CONFIG refused, Redis unreachable).
    note: str | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "persistence": self.persistence,
            "eviction_policy": self.eviction_policy,
            "warning": self.warning,
        }
        if self.note is not None:
            body["note"] = self.note
        return body


def judge(config: Mapping[str, str]) -> Durability:
    """The verdict on one server's `appendonly`, `save` and `maxmemory-policy` values."""
    persistence: Persistence
    if config.get("appendonly", "").lower() == "yes":
        persistence = "aof"
    elif config.get("save", "").strip():
        persistence = "rdb"
    else:
        persistence = "none"
    policy = config.get("maxmemory-policy", "").lower() or None
    problems = []
    if persistence == "none":
        problems.append(
            "it keeps nothing on disk (appendonly no, no save points): a restart loses usage "
            "records, runtime client keys, quota counters and key health; run it with "
            "--appendonly yes --appendfsync everysec"
        )
    if policy is not None and policy != _SAFE_POLICY:
        problems.append(
            f"its maxmemory-policy {policy} evicts keys when memory is full: usage records, "
            "quota counters and runtime client keys can vanish; use noeviction, and a Redis of "
            "the cache's own (GATEWAY_CACHE_REDIS_URL) for what may be evicted"
        )
    warning = "state Redis: " + "; ".join(problems) if problems else None
    return Durability(persistence, policy, warning)


async def read_durability(redis: aioredis.Redis) -> Durability:
    """Ask the state Redis (every primary of a Cluster), within a second; never raises."""
    per_node: dict[str, dict[str, str]] = {}
    try:
        async with asyncio.timeout(_BUDGET_SECONDS):
            for name in _SETTINGS:
                for node, value in (await _config_get(redis, name)).items():
                    if value is None:  # a setting the server hides
                        return Durability("unknown", None, note=_CONFIG_REFUSED)
                    per_node.setdefault(node, {})[name] = value
    except (*REDIS_FAILURES, CLUSTER_UNREACHABLE) as exc:
        refused = refused_command(exc)
        return Durability("unknown", None, note=_CONFIG_REFUSED if refused else _UNREACHABLE)
    verdicts = [judge(config) for _node, config in sorted(per_node.items())]
    if not verdicts:
        return Durability("unknown", None, note=_UNREACHABLE)
    return next((verdict for verdict in verdicts if verdict.warning), verdicts[0])


async def _config_get(redis: aioredis.Redis, name: str) -> dict[str, str | None]:
    """node -> the value of `name` there (one node, "", unless it is a Cluster)."""
    if not isinstance(redis, RedisCluster):
        return {"": _value(await redis.config_get(name), name)}
    answers = await redis.config_get(name, target_nodes=RedisCluster.PRIMARIES)
    single = _value(answers, name)
    if single is not None:
        return {"": single}  # a Cluster of one primary answers as one server does
    return {str(node): _value(answer, name) for node, answer in answers.items()}


def _value(answer: object, name: str) -> str | None:
    if isinstance(answer, Mapping):
        for key, value in answer.items():
            if _text(key) == name:
                return _text(value)
    return None


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class DurabilityCheck:
    """The state Redis' last verdict, for /readyz; logs when it changes (once at startup, again
    only if the operator changes Redis or a failover lands on a differently configured node)."""

    def __init__(self, redis: aioredis.Redis, *, shared_with_cache: bool) -> None:
        self._redis = redis
        self.shared_with_cache = shared_with_cache
        self.last: Durability | None = None

    async def check(self) -> Durability:
        found = await read_durability(self._redis)
        if found != self.last:
            _log(found, self.last)
        self.last = found
        return found

    def as_json(self) -> dict[str, Any] | None:
        if self.last is None:
            return None
        return {**self.last.as_json(), "shared_with_cache": self.shared_with_cache}


def _log(found: Durability, before: Durability | None) -> None:
    # Never the URL: it may hold the password.
    if found.warning is not None:
        log.warning("%s", found.warning)
    elif found.note == _CONFIG_REFUSED:
        log.info("state Redis: persistence and eviction not checked: %s", _CONFIG_REFUSED)
    elif found.note is None and (before is None or before.warning is not None):
        log.info(
            "state Redis: persistence %s, maxmemory-policy %s",
            found.persistence,
            found.eviction_policy,
        )
