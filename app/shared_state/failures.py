"""Redis failures, translated once: each store runs its Redis calls inside `store_errors()`, so
everything above the stores (their own fail-open paths, services, routes) catches only
StoreUnavailable, the way httpx maps httpcore's exceptions at its one transport seam."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import NoPermissionError, RedisClusterException, RedisError, ResponseError

from app.errors import StoreUnavailable

# What a Redis call fails with: redis-py's own errors, the socket's, and a timeout (a store's
# own budget, or the client's socket timeout).
REDIS_FAILURES = (RedisError, OSError, TimeoutError)
# What a Cluster client raises, instead of a RedisError, when no node answers to tell it the
# cluster's layout (for callers that must never raise, such as the durability check).
CLUSTER_UNREACHABLE = RedisClusterException


def refused_command(exc: BaseException) -> bool:
    """Whether Redis refused the command itself: renamed or disabled (an unknown command, as
    `rename-command CONFIG ""` and managed Redis services do) or denied by an ACL; not a server
    that is down, loading or failing over."""
    if isinstance(exc, NoPermissionError):
        return True
    return type(exc) is ResponseError and "unknown command" in str(exc).lower()


@contextmanager
def store_errors(action: str) -> Iterator[None]:
    """Run Redis calls; a failure leaves as StoreUnavailable, saying what could not be done.

    Only the error's type is kept: a Redis error's text can carry the URL, password included.
    """
    try:
        yield
    except REDIS_FAILURES as exc:
        raise StoreUnavailable(
            f"Cannot {action} now: the shared store is unreachable.",
            action=action,
            cause=type(exc).__name__,
        ) from None
