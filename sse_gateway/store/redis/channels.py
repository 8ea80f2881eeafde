"""Push messages to users on Redis (DESIGN.md §4.3).

    sse:{user:<user>}:events   Redis Stream of push messages (ids from Redis: unique, increasing),
                               fields `e` (event name) and `d` (JSON data), trimmed by age and count
    sse:{user:<user>}:cursor   id of the last message delivered to any of the user's connections
    sse:{user:<user>}          the pub/sub channel that says the user has a new message (sharded
                               pub/sub on a cluster); the hash tag keeps all three on one slot

Each user with connections here has one cache of new messages, filled by one XRANGE per wake-up
and shared by all of that user's local connections, so that a message fans out to a thousand
local connections with one read, not a thousand. Delivery cursors are recorded in the
background, one write in flight at a time, batched.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from .. import READ_BATCH, Message, UserChannels, Wake, message_id_key, newer_than
from .connection import UNREACHABLE, Script, guarded, ms
from .listener import Subscriptions

__all__ = ["RedisChannels"]

log = logging.getLogger("sse_gateway.store")

CURSOR_RETRY = 0.5  # seconds between attempts to record push cursors while Redis is away

# KEYS: the user's events. ARGV: event, data, the count cap, the oldest id kept, the retention in
# ms, the user's channel, the publish command (PUBLISH, or SPUBLISH on a cluster), this instance.
_PUBLISH = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], '*', 'e', ARGV[1], 'd', ARGV[2])
redis.call('XTRIM', KEYS[1], 'MINID', '~', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call(ARGV[7], ARGV[6], ARGV[8])
return id
"""

_ADVANCE_CURSOR = """
local function parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local current = redis.call('GET', KEYS[1])
if current then
  local a, b = parts(current)
  local c, d = parts(ARGV[1])
  if c < a or (c == a and d <= b) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


class _UserCache:
    """New messages of a user with connections here. Every message after `since` is in
    `messages`, so a reader positioned at or after `since` is served without Redis."""

    __slots__ = ("since", "messages", "refreshing", "again")

    def __init__(self, since: str) -> None:
        self.since = since
        self.messages: collections.deque[Message] = collections.deque()
        self.refreshing = False
        self.again = False

    @property
    def last(self) -> str:
        return self.messages[-1].id if self.messages else self.since


class RedisChannels(UserChannels):
    def __init__(self, client: Any, subscriptions: Subscriptions, prefix: str, publish: str = "PUBLISH") -> None:
        self._client = client
        self._subscriptions = subscriptions
        self._prefix = prefix
        self.instance = subscriptions.instance
        self._publish_command = publish  # PUBLISH, or SPUBLISH on a cluster
        self._publish = Script(client, _PUBLISH)
        self._advance_cursor = Script(client, _ADVANCE_CURSOR)
        self._users: dict[str, _UserCache] = {}  # users with connections here
        self._keep = 1000  # messages a user cache holds, at most (publish() passes the real cap)
        self._cursors: dict[str, tuple[str, float]] = {}  # user -> (message id, retention) to record
        self._cursor_flush: asyncio.Task[None] | None = None
        self._closing = False
        self._waiting: set[Wake] = set()  # channels opened while Redis was away
        subscriptions.route(f"{prefix}{{user:", self._received)
        subscriptions.on_back(self._back)

    def _back(self) -> None:
        self._refresh_all()
        waiting, self._waiting = self._waiting, set()
        for wake in waiting:
            wake()

    def when_back(self, wake: Wake) -> None:
        self._waiting.add(wake)

    def forget(self, wake: Wake) -> None:
        self._waiting.discard(wake)

    def _events(self, user: str) -> str:
        return f"{self._prefix}{{user:{user}}}:events"

    def _channel(self, user: str) -> str:
        return f"{self._prefix}{{user:{user}}}"

    def _cursor_key(self, user: str) -> str:
        return f"{self._prefix}{{user:{user}}}:cursor"

    def _received(self, channel: str, data: bytes) -> None:
        if data == self.instance.encode():
            return  # published here: publish() refreshed the cache
        user = channel[len(self._prefix) + len("{user:"):-1]
        if user in self._users:
            self._subscriptions.spawn(self._refresh(user))
        else:
            self._subscriptions.wake(channel)

    def _refresh_all(self) -> None:
        for user in list(self._users):
            self._subscriptions.spawn(self._refresh(user))

    @guarded
    async def publish(self, user: str, event: str, data: bytes, retention: float, keep: int) -> str:
        key = self._events(user)
        oldest = f"{int((time.time() - retention) * 1000)}-0"
        self._keep = keep
        # The count cap is exact (a user gets at most `keep` old messages); the age trim may be
        # approximate, as reads filter by age anyway.
        message_id = await self._publish(keys=[key], args=[event, data, keep, oldest, ms(retention), self._channel(user),
                                                           self._publish_command, self.instance])
        if user in self._users:
            self._subscriptions.spawn(self._refresh(user))
        return message_id.decode()

    async def _fetch(self, user: str, after: str | None, retention: float) -> list[Message]:
        entries = await self._client.xrange(self._events(user), min=f"({after}" if after else "-", max="+",
                                            count=READ_BATCH)
        oldest_ms = (time.time() - retention) * 1000
        messages = []
        for raw_id, fields in entries:
            message_id = raw_id.decode()
            if message_id_key(message_id)[0] >= oldest_ms:  # trimming is approximate
                messages.append(Message(message_id, fields[b"e"].decode(), fields[b"d"]))
        return messages

    async def _refresh(self, user: str) -> None:
        """Read the user's new messages once into the cache, then wake the user's connections."""
        cache = self._users.get(user)
        if cache is None:
            return
        if cache.refreshing:
            cache.again = True  # the running refresh reads once more when it is done
            return
        cache.refreshing = True
        try:
            while True:
                cache.again = False
                try:
                    new = await self._fetch(user, cache.last, retention=float("inf"))
                except (RedisError, OSError):
                    new = []  # readers find Redis gone on their own read; _back() refreshes later
                cache.messages.extend(new)
                while len(cache.messages) > self._keep:
                    cache.since = cache.messages.popleft().id
                if not cache.again and len(new) < READ_BATCH:
                    break
        finally:
            cache.refreshing = False
        self._subscriptions.wake(self._channel(user))

    @guarded
    async def messages_after(self, user: str, after: str | None, retention: float) -> list[Message]:
        cache = self._users.get(user)
        if cache is not None and after is not None and message_id_key(after) >= message_id_key(cache.since):
            return newer_than(cache.messages, after, (time.time() - retention) * 1000)
        return await self._fetch(user, after, retention)

    @guarded
    async def watch(self, user: str, wake: Wake) -> None:
        channel = self._channel(user)
        await self._subscriptions.watch(channel, wake)
        if user not in self._users and self._subscriptions.watched(channel):
            # Subscribed first, then the newest id: every message after it will be notified.
            newest = await self._client.xrevrange(self._events(user), max="+", min="-", count=1)
            if user not in self._users:
                self._users[user] = _UserCache(newest[0][0].decode() if newest else "0-0")
                self._subscriptions.spawn(self._refresh(user))  # anything published between the two steps

    def unwatch(self, user: str, wake: Wake) -> None:
        channel = self._channel(user)
        self._subscriptions.unwatch(channel, wake)
        if not self._subscriptions.watched(channel):
            self._users.pop(user, None)

    @guarded
    async def cursor(self, user: str) -> str | None:
        value = await self._client.get(self._cursor_key(user))
        recorded = value.decode() if value is not None else None
        pending = self._cursors.get(user)  # delivered here, not yet written
        if pending is not None and (recorded is None or message_id_key(pending[0]) > message_id_key(recorded)):
            return pending[0]
        return recorded

    async def advance_cursor(self, user: str, message_id: str, retention: float) -> None:
        """Recorded at once in the background, one write in flight at a time: what the user's
        other connections here deliver meanwhile is written together next, so a message
        delivered to a thousand local connections costs two writes, not a thousand."""
        pending = self._cursors.get(user)
        if pending is None or message_id_key(message_id) > message_id_key(pending[0]):
            self._cursors[user] = (message_id, retention)
        if self._cursor_flush is None:
            self._cursor_flush = asyncio.ensure_future(self._flush_cursors())

    async def _flush_cursors(self) -> None:
        try:
            # Entries stay in _cursors until written, so that cursor() sees them meanwhile.
            writing = dict(self._cursors)
            results = await asyncio.gather(*(
                self._advance_cursor(keys=[self._cursor_key(user)], args=[message_id, ms(retention)])
                for user, (message_id, retention) in writing.items()
            ), return_exceptions=True)  # concurrent, on the pool (one slot per user on a cluster)
            failure: BaseException | None = None
            for (user, entry), result in zip(writing.items(), results, strict=True):
                if isinstance(result, BaseException):
                    failure = failure or result
                elif self._cursors.get(user) == entry:
                    del self._cursors[user]
            if failure is not None:
                raise failure
        except UNREACHABLE:
            log.warning("redis unavailable: push cursors not recorded yet")
            await asyncio.sleep(CURSOR_RETRY)
        finally:
            self._cursor_flush = None
            if self._cursors and not self._closing:
                self._cursor_flush = asyncio.ensure_future(self._flush_cursors())

    async def close(self) -> None:
        if self._cursor_flush is not None:  # record what was delivered, if Redis lets us soon
            await asyncio.wait([self._cursor_flush], timeout=1)
        self._closing = True
        if self._cursor_flush is not None:
            self._cursor_flush.cancel()
            await asyncio.gather(self._cursor_flush, return_exceptions=True)
