"""Keys with an expiry, and the counters of limits, on Redis."""

from __future__ import annotations

import time
from typing import Any

from .. import Counters, Keys
from .connection import Script, guarded, ms

__all__ = ["RedisCounters", "RedisKeys"]

_COUNT_EVENT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""

_ADD = """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[2]) end
return redis.call('INCRBY', KEYS[1], ARGV[1])
"""

_TAKE_SLOT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[2] - ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""


class RedisKeys(Keys):
    """`sse:kv:<key>`: tickets, sessions, idempotency keys."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix

    def _kv(self, key: str) -> str:
        return f"{self._prefix}kv:{key}"

    @guarded
    async def put(self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False) -> bytes | None:
        if only_if_absent:
            # SET NX GET (Redis 7): sets when absent, and returns the live value otherwise.
            result: bytes | None = await self._client.set(self._kv(key), value, px=ms(ttl), nx=True, get=True)
            return result
        await self._client.set(self._kv(key), value, px=ms(ttl))
        return None

    @guarded
    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._client.get(self._kv(key))
        return value

    @guarded
    async def delete(self, key: str) -> None:
        await self._client.delete(self._kv(key))

    @guarded
    async def expire(self, key: str, ttl: float) -> None:
        await self._client.pexpire(self._kv(key), ms(ttl))


class RedisCounters(Counters):
    """`sse:window:<key>:<start>` counts; `sse:slots:<key>` sorted sets of held slots."""

    def __init__(self, client: Any, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._count_event = Script(client, _COUNT_EVENT)
        self._take_slot = Script(client, _TAKE_SLOT)
        self._add = Script(client, _ADD)

    @guarded
    async def count_event(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        start = now - now % window
        name = f"{self._prefix}window:{key}:{start:.0f}"
        count, ttl_ms = await self._count_event(keys=[name], args=[ms(start + window - now)])
        return int(count), max(0.0, int(ttl_ms) / 1000)

    @guarded
    async def take_slot(self, key: str, member: str, limit: int, max_age: float) -> bool:
        now_ms = int(time.time() * 1000)
        taken = await self._take_slot(keys=[f"{self._prefix}slots:{key}"], args=[member, now_ms, ms(max_age), limit])
        return bool(taken)

    @guarded
    async def add(self, key: str, amount: int, max_age: float, initial: int = 0) -> int:
        return int(await self._add(keys=[f"{self._prefix}total:{key}"], args=[amount, ms(max_age), initial]))

    @guarded
    async def free_slot(self, key: str, member: str) -> None:
        await self._client.zrem(f"{self._prefix}slots:{key}", member)
