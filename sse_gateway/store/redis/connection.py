"""The process's connection to Redis, and what every part of the Redis store shares.

One connection pool per process (bounded: a burst of readers waits for a connection rather than
opening thousands). Every failure to reach Redis surfaces as `StoreUnavailable` (a 503); redis-py
reconnects by itself on the next command once Redis is back.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...errors import GatewayError
from ...logs import Throttled
from .. import StoreUnavailable

__all__ = ["UNREACHABLE", "connect", "error_from_json", "error_to_json", "guarded", "ms", "outage"]

log = logging.getLogger("sse_gateway.store")

P = ParamSpec("P")
T = TypeVar("T")

POOL_SIZE = 64
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)  # BusyLoadingError included


def connect(url: str) -> Any:
    """A client on its own bounded pool. Typed Any: redis-py types replies as unions of bytes,
    str and None, where this client (decode_responses off) always has bytes."""
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=POOL_SIZE, timeout=5, socket_connect_timeout=2, socket_timeout=5,
        retry=retry, health_check_interval=30,
    )
    return aioredis.Redis(connection_pool=pool)


class _OutageLog:
    """One line per 10 s while Redis is away, however many calls fail meanwhile."""

    def __init__(self) -> None:
        self._throttled = Throttled(log, 10.0)

    def warn(self, exc: BaseException, what: str = "") -> None:
        self._throttled.warning("redis unavailable: %s%s", exc.__class__.__name__, what)


outage = _OutageLog()


def guarded(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn a failure to reach Redis into StoreUnavailable (a 503 for the caller). An error
    reply is a bug of ours, not an outage, and is left to surface as one."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except UNREACHABLE as exc:
            outage.warn(exc)
            raise StoreUnavailable() from None

    return call


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def error_to_json(error: GatewayError | None) -> bytes:
    if error is None:
        return b""
    fields = {"status": error.status, "message": error.message, "type": error.type, "code": error.code,
              "param": error.param, "retry_after": error.retry_after}
    return orjson.dumps(fields)


def error_from_json(raw: bytes | None) -> GatewayError | None:
    if not raw:
        return None
    f = orjson.loads(raw)
    return GatewayError(f["status"], f["message"], type=f["type"], code=f["code"], param=f["param"],
                        retry_after=f["retry_after"])
