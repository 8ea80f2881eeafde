"""The process's connection to Redis, and what every part of the Redis store shares.

One connection pool per process (bounded: a burst of readers waits for a connection rather than
opening thousands). Every failure to reach Redis surfaces as `StoreUnavailable` (a 503); redis-py
reconnects by itself on the next command once Redis is back.

`redis+cluster://[user:password@]host:port[,host:port…]` (or `rediss+cluster://`) names a Redis
Cluster: one seed node is enough, redis-py's cluster client discovers the rest and routes each
command to the shard that owns its key. Every key that a script or a transaction touches
together shares a hash tag (`{stream:<id>}`, `{user:<id>}`), so each runs on one slot.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import urllib.parse
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ...errors import GatewayError
from ...logs import Throttled
from .. import StoreUnavailable

__all__ = ["UNREACHABLE", "Script", "cluster_seeds", "connect", "error_from_json", "error_to_json", "guarded", "is_cluster", "ms", "node_url",
           "outage"]

log = logging.getLogger("sse_gateway.store")

P = ParamSpec("P")
T = TypeVar("T")

POOL_SIZE = 64
# BusyLoadingError included; on a cluster, a shard that is down or a slot nobody serves.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError, ClusterDownError, SlotNotCoveredError,
               RedisClusterException)  # "cannot be connected": no node answers

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme in CLUSTER_SCHEMES


def cluster_seeds(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The seed nodes of a `redis+cluster://` URL, and the connection options they share."""
    parts = urllib.parse.urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = []
    for host_port in hosts.split(","):
        host, _, port = host_port.strip().rpartition(":")
        seeds.append((host.strip("[]") or "127.0.0.1", int(port or 6379)))
    options: dict[str, Any] = {"ssl": parts.scheme == "rediss+cluster"}
    if credentials:
        user, _, password = credentials.rpartition(":")
        options["username"] = urllib.parse.unquote(user) or None
        options["password"] = urllib.parse.unquote(password)
    return seeds, options


def node_url(url: str, host: str, port: int) -> str:
    """A `redis://` URL for one node of the cluster `url` names, with its credentials."""
    parts = urllib.parse.urlsplit(url)
    credentials, _, _hosts = parts.netloc.rpartition("@")
    scheme = "rediss" if parts.scheme == "rediss+cluster" else "redis"
    return f"{scheme}://{credentials + '@' if credentials else ''}{host}:{port}/0"


class _BoundedCluster(RedisCluster):
    """redis-py's cluster client has no blocking pool: a command finding its node's pool full
    fails at once (MaxConnectionsError). Here a burst of readers waits for room instead, as on
    one Redis, with at most POOL_SIZE commands (so connections per node) under way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.room = asyncio.Semaphore(POOL_SIZE)

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        if self._initialize:
            # The slot map first, read once: commands let in while it is being read were seen
            # routed to the wrong nodes (MOVED), and the refreshes that follow break
            # connections other commands are opening.
            await self.initialize()
        async with self.room:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ClusterPipeline:
        if transaction or shard_hint:
            raise ValueError("cluster pipelines here are not transactions")
        return _BoundedPipeline(self)


class _BoundedPipeline(ClusterPipeline):
    async def execute(self, *args: Any, **kwargs: Any) -> Any:
        await self.cluster_client.initialize()
        async with self.cluster_client.room:  # type: ignore[attr-defined]
            return await super().execute(*args, **kwargs)


def connect(url: str) -> Any:
    """A client on its own bounded pool (on a cluster: one per node). Typed Any: redis-py types
    replies as unions of bytes, str and None, where this client (decode_responses off) always
    has bytes."""
    retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1)
    if is_cluster(url):
        seeds, options = cluster_seeds(url)
        # Without full coverage: the shards that are up keep serving their slots while one is down.
        return _BoundedCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in seeds], require_full_coverage=False,
            max_connections=POOL_SIZE, socket_connect_timeout=2, socket_timeout=5, retry=retry,
            health_check_interval=30, **options,
        )
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


class Script:
    """A Lua script run by its digest, and by its text where a node does not have it yet (a
    restarted Redis, a new primary). Unlike redis-py's Script, whose fallback loads the script
    on every primary of a cluster, this one touches only the node of the script's keys, so a
    shard that is down fails only the scripts that run on it."""

    def __init__(self, client: Any, text: str) -> None:
        self._client = client
        self._text = text
        self._digest = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._client.evalsha(self._digest, len(keys), *keys, *args)
        except NoScriptError:
            return await self._client.eval(self._text, len(keys), *keys, *args)


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
