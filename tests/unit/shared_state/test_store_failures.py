"""Redis failures are translated once, at the store: StoreUnavailable says what could not be
done and names the cause's type, never its text (which can carry the Redis URL)."""

from __future__ import annotations

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from app.errors import StoreUnavailable
from app.shared_state.failures import store_errors

SECRET_URL = "redis://:hunter2-password@10.0.0.5:6379/0"


@pytest.mark.parametrize(
    "failure",
    [
        RedisConnectionError(f"Error connecting to {SECRET_URL}"),
        OSError(SECRET_URL),
        TimeoutError(),
    ],
)
def test_store_errors_turns_each_redis_failure_into_store_unavailable(failure: Exception) -> None:
    with pytest.raises(StoreUnavailable) as caught, store_errors("admit a request"):
        raise failure
    error = caught.value
    assert (error.status_code, error.code) == (503, "store_unavailable")
    assert error.action == "admit a request"
    assert error.cause == type(failure).__name__
    assert error.message == "Cannot admit a request now: the shared store is unreachable."
    assert "hunter2" not in str(error) and error.__cause__ is None and error.__suppress_context__


def test_store_errors_lets_every_other_error_through() -> None:
    with pytest.raises(KeyError), store_errors("read usage"):
        raise KeyError("a bug, not Redis")
