"""Redis failures, translated once: each store runs its Redis calls inside `store_errors()`, so
everything above the stores (their own fail-open paths, services, routes) catches only
StoreUnavailable, the way httpx maps httpcore's exceptions at its one transport seam."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis.exceptions import RedisError

from app.errors import StoreUnavailable

# What a Redis call fails with: redis-py's own errors, the socket's, and a timeout (a store's
# own budget, or the client's socket timeout).
REDIS_FAILURES = (RedisError, OSError, TimeoutError)


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
