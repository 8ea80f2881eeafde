"""The shared store: Redis, for several gateway instances acting as one (DESIGN.md §4.2, §4.3).

Layout (every key under the `sse:` prefix):

    sse:stream:<id>            hash: owner, instance, state, start_error, readers
    sse:stream:<id>:log        Redis Stream; entry `<seq>-0` holds frame number seq in field `f`,
                               so "the frames after position k" is `XRANGE (k-0 +`
    sse:user:<user>:events     Redis Stream of push messages (ids from Redis: unique, increasing),
                               fields `e` (event name) and `d` (JSON data), trimmed by age and count
    sse:user:<user>:cursor     id of the last message delivered to any of the user's connections
    sse:kv:<key>               tickets, sessions, idempotency keys

Pub/sub carries only wake-ups, never data: `sse:stream:<id>` and `sse:user:<user>` say "look
again", `sse:instance:<id>` carries control messages to one instance. Readers always read from
the Streams by position, so a wake-up lost during a reconnect costs latency, never a frame: the
listener wakes every local reader once it is back.

Two in-process caches keep the common paths off the network. Streams produced here are mirrored
in memory until a little after they end, so that their local readers (most readers) never read
from Redis; only the writes go there. And each user with connections here has one cache of new
messages, filled by one XRANGE per wake-up and shared by all of that user's local connections,
so that a message fans out to a thousand local connections with one read, not a thousand.

One connection pool per process (bounded: a burst of readers waits for a connection rather than
opening thousands), plus one dedicated pub/sub connection. Every Redis failure surfaces as
`StoreUnavailable` (503); redis-py reconnects by itself on the next command once Redis is back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..errors import GatewayError
from . import READ_BATCH, Message, Store, StoreUnavailable, StreamInfo, StreamState, Wake, message_id_key, newer_than

__all__ = ["RedisStore"]

log = logging.getLogger("sse_gateway.store")

P = ParamSpec("P")
T = TypeVar("T")

MAX_QUEUED = 1000  # frames a producer may get ahead of Redis before it waits
LOCAL_LINGER = 10.0  # seconds a local mirror outlives its stream's end, for its last readers
STREAM_MAX_AGE = 86_400  # seconds a stream's keys live before it ends (a crashed producer's too)
SUBSCRIBE_TIMEOUT = 5.0
RECONNECT_WAIT = 2.0  # seconds a request waits for a reconnect attempt of the pub/sub connection
CURSOR_RETRY = 0.5  # seconds between attempts to record push cursors while Redis is away
POOL_SIZE = 64

_ADD_READERS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'readers', ARGV[1])
if n < 0 then redis.call('HSET', KEYS[1], 'readers', 0) n = 0 end
return n
"""

_COUNT_EVENT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
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


_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)  # BusyLoadingError included


def _guarded(method: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn a failure to reach Redis into StoreUnavailable (a 503 for the caller). An error
    reply is a bug of ours, not an outage, and is left to surface as one."""

    @functools.wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except _UNREACHABLE as exc:
            log.warning("redis unavailable: %s", exc.__class__.__name__)
            raise StoreUnavailable() from None

    return call


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _error_to_json(error: GatewayError | None) -> bytes:
    if error is None:
        return b""
    fields = {"status": error.status, "message": error.message, "type": error.type, "code": error.code,
              "param": error.param, "retry_after": error.retry_after}
    return orjson.dumps(fields)


def _error_from_json(raw: bytes | None) -> GatewayError | None:
    if not raw:
        return None
    f = orjson.loads(raw)
    return GatewayError(f["status"], f["message"], type=f["type"], code=f["code"], param=f["param"],
                        retry_after=f["retry_after"])


class _LocalLog:
    """A stream produced by this instance, as written: its local readers read it from here."""

    __slots__ = ("owner", "state", "frames", "start_error", "writing", "broken", "queued", "drained")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.state = StreamState.PENDING
        self.frames: list[bytes] = []  # as written to Redis
        self.start_error: GatewayError | None = None
        self.writing = asyncio.Lock()
        self.broken = False  # a write failed: Redis is away, and so is what readers would read next
        self.queued: list[bytes] = []  # appended, not yet written
        self.drained = asyncio.Event()  # nothing queued and nothing in flight
        self.drained.set()


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


class _Listener:
    """The process's one pub/sub connection: confirmed subscriptions, reconnection, dispatch."""

    def __init__(self, client: aioredis.Redis, on_message: Callable[[str, bytes], None],
                 on_lost: Callable[[], None], on_back: Callable[[], None]) -> None:
        self._pubsub = client.pubsub()
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_back = on_back
        self._lock = asyncio.Lock()
        self._confirmations: dict[str, list[asyncio.Future[None]]] = {}
        self._task: asyncio.Task[None] | None = None
        self.healthy = True
        self._retry_now = asyncio.Event()  # cuts a reconnect backoff short
        self._attempt: asyncio.Future[bool] | None = None  # the outcome of the next reconnect attempt

    async def usable(self) -> bool:
        """True when the pub/sub connection works. While it is lost, try to reconnect now (not
        at the end of the backoff) and answer with the outcome of that attempt."""
        if self.healthy or self._task is None:
            return True
        if self._attempt is None or self._attempt.done():
            self._attempt = asyncio.get_running_loop().create_future()
        attempt = self._attempt
        self._retry_now.set()
        try:
            return await asyncio.wait_for(asyncio.shield(attempt), RECONNECT_WAIT)
        except TimeoutError:
            return False

    async def subscribe(self, channel: str) -> None:
        """Subscribe and wait for Redis to confirm: from then on, no message is missed."""
        if not await self.usable():
            raise StoreUnavailable()
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations.setdefault(channel, []).append(confirmed)
        try:
            async with self._lock:
                await self._pubsub.subscribe(channel)
            if self._task is None:
                self._task = asyncio.get_running_loop().create_task(self._run(), name="redis-listener")
            await asyncio.wait_for(asyncio.shield(confirmed), SUBSCRIBE_TIMEOUT)
        except (TimeoutError, RedisError, OSError, StoreUnavailable):
            waiting = self._confirmations.get(channel, [])
            if confirmed in waiting:
                waiting.remove(confirmed)
            raise StoreUnavailable() from None

    async def unsubscribe(self, channel: str) -> None:
        try:
            async with self._lock:
                await self._pubsub.unsubscribe(channel)
        except (RedisError, OSError):
            pass  # a reconnect re-subscribes only what is still wanted

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                # A timeout, so that a read that returns empty-handed still proves the connection
                # alive: health follows the connection, not the traffic on it.
                message = await self._pubsub.get_message(timeout=1.0)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                if self.healthy:
                    log.warning("redis pub/sub connection lost (%s); reconnecting", exc.__class__.__name__)
                    self.healthy = False
                    self._fail_pending()
                    self._on_lost()
                self._attempted(False)
                self._retry_now.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._retry_now.wait(), backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if not self.healthy:
                self.healthy = True
                log.info("redis pub/sub connection back")
                self._on_back()
            self._attempted(True)
            if message is None:
                continue
            channel = message["channel"].decode() if isinstance(message["channel"], bytes) else message["channel"]
            if message["type"] == "subscribe":
                for future in self._confirmations.pop(channel, []):
                    if not future.done():
                        future.set_result(None)
            elif message["type"] == "message":
                self._on_message(channel, message["data"])

    def _attempted(self, success: bool) -> None:
        if self._attempt is not None and not self._attempt.done():
            self._attempt.set_result(success)

    def _fail_pending(self) -> None:
        """Subscriptions waiting for a confirmation that cannot come fail now, not at their timeout."""
        for futures in self._confirmations.values():
            for future in futures:
                if not future.done():
                    future.set_exception(StoreUnavailable())
        self._confirmations.clear()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._pubsub.aclose()


class RedisStore(Store):
    def __init__(self, url: str, prefix: str = "sse:") -> None:
        self.instance = secrets.token_hex(6)
        self._instance_bytes = self.instance.encode()
        self._prefix = prefix
        retry = Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1)
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=POOL_SIZE, timeout=5, socket_connect_timeout=2, socket_timeout=5,
            retry=retry, health_check_interval=30,
        )
        # Typed Any: redis-py types replies as unions of bytes, str and None, where this client
        # (decode_responses off) always has bytes.
        self._client: Any = aioredis.Redis(connection_pool=pool)
        self._add_readers = self._client.register_script(_ADD_READERS)
        self._advance_cursor = self._client.register_script(_ADVANCE_CURSOR)
        self._count_event = self._client.register_script(_COUNT_EVENT)
        self._take_slot = self._client.register_script(_TAKE_SLOT)
        self._listener = _Listener(self._client, self._dispatch, self._wake_all, self._back)
        self._watchers: dict[str, set[Wake]] = {}  # channel -> local wake-ups
        self._subscribed: set[str] = set()  # channels this process is subscribed to in Redis
        self._control: Callable[[str, str], None] | None = None
        self._control_ready: asyncio.Task[None] | None = None
        self._local: dict[str, _LocalLog] = {}  # streams produced here
        self._dirty: dict[str, _LocalLog] = {}  # streams with frames queued for the flusher
        self._flusher: asyncio.Task[None] | None = None
        self._users: dict[str, _UserCache] = {}  # users with connections here
        self._keep = 1000  # messages a user cache holds, at most (publish() passes the real cap)
        self._cursors: dict[str, tuple[str, float]] = {}  # user -> (message id, retention) to record
        self._cursor_flush: asyncio.Task[None] | None = None
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()

    # --- names -----------------------------------------------------------------------------

    def _meta(self, stream_id: str) -> str:
        return f"{self._prefix}stream:{stream_id}"

    def _log(self, stream_id: str) -> str:
        return f"{self._prefix}stream:{stream_id}:log"

    def _events(self, user: str) -> str:
        return f"{self._prefix}user:{user}:events"

    def _user_channel(self, user: str) -> str:
        return f"{self._prefix}user:{user}"

    def _control_channel(self, instance: str) -> str:
        return f"{self._prefix}instance:{instance}"

    # --- pub/sub -------------------------------------------------------------------------------

    def _dispatch(self, channel: str, data: bytes) -> None:
        if channel == self._control_channel(self.instance):
            verb, _, stream_id = data.decode().partition(" ")
            if self._control is not None:
                self._control(verb, stream_id)
            return
        if data == self._instance_bytes:
            return  # our own change: local readers were woken when it was made
        user = self._user_of(channel)
        if user is not None and user in self._users:
            self._spawn(self._refresh(user))
            return
        for wake in self._watchers.get(channel, ()):
            wake()

    def _user_of(self, channel: str) -> str | None:
        prefix = f"{self._prefix}user:"
        return channel[len(prefix):] if channel.startswith(prefix) else None

    def _back(self) -> None:
        """Redis is back: notifications may have been lost, so look again everywhere."""
        for user in list(self._users):
            self._spawn(self._refresh(user))
        self._wake_all()

    def _wake_all(self) -> None:
        """Every local reader looks again: after a reconnect, or to find Redis gone."""
        for watchers in list(self._watchers.values()):
            for wake in list(watchers):
                wake()

    async def _watch(self, channel: str, wake: Wake, *, local_only: bool = False) -> None:
        """Wake `wake` on changes. `local_only`: every change is made here (a stream produced
        by this instance), so no Redis subscription is needed."""
        await self._ready()
        self._watchers.setdefault(channel, set()).add(wake)
        if local_only or channel in self._subscribed:
            return
        self._subscribed.add(channel)
        try:
            await self._listener.subscribe(channel)
        except StoreUnavailable:
            self._subscribed.discard(channel)
            self._unwatch(channel, wake)
            raise

    def _unwatch(self, channel: str, wake: Wake) -> None:
        watchers = self._watchers.get(channel)
        if watchers is None:
            return
        watchers.discard(wake)
        if not watchers:
            del self._watchers[channel]
            if channel in self._subscribed:
                self._spawn(self._unsubscribe_if_idle(channel))

    async def _unsubscribe_if_idle(self, channel: str) -> None:
        if channel not in self._watchers and channel in self._subscribed:
            self._subscribed.discard(channel)
            await self._listener.unsubscribe(channel)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ready(self) -> None:
        """Subscribe to this instance's control channel once, before anything depends on it."""
        if self._control_ready is None or (self._control_ready.done() and self._control_ready.exception()):
            self._control_ready = asyncio.ensure_future(self._listener.subscribe(self._control_channel(self.instance)))
        await asyncio.shield(self._control_ready)

    # --- stream logs -----------------------------------------------------------------------

    @_guarded
    async def create_stream(self, stream_id: str, owner: str, instance: str) -> None:
        await self._ready()
        meta = self._meta(stream_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hset(meta, mapping={"owner": owner, "instance": instance, "state": StreamState.PENDING.value, "readers": 0})
            pipe.expire(meta, STREAM_MAX_AGE)
            await pipe.execute()
        self._local[stream_id] = _LocalLog(owner)

    def _info(self, stream_id: str, fields: dict[bytes, bytes], length: int) -> StreamInfo | None:
        if b"owner" not in fields:
            return None
        return StreamInfo(
            stream_id, fields[b"owner"].decode(), StreamState(fields[b"state"].decode()), length,
            fields.get(b"instance", b"").decode(), _error_from_json(fields.get(b"start_error")),
        )

    def _local_info(self, stream_id: str, local: _LocalLog) -> StreamInfo:
        if local.broken:
            raise StoreUnavailable()
        return StreamInfo(stream_id, local.owner, local.state, len(local.frames), self.instance, local.start_error)

    @_guarded
    async def stream_info(self, stream_id: str) -> StreamInfo | None:
        local = self._local.get(stream_id)
        if local is not None:
            return self._local_info(stream_id, local)
        # Without MULTI: end_stream writes its frames and state at once, and a reader compares
        # its position with the length read after the state, so no order of events misleads it.
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._meta(stream_id))
            pipe.xlen(self._log(stream_id))
            fields, length = await pipe.execute()
        return self._info(stream_id, fields, length)

    async def _write(self, stream_id: str, write: Callable[[Any, _LocalLog], None],
                     written: Callable[[_LocalLog], None]) -> None:
        """One write of a stream produced here: Redis first, then the mirror.

        Writes of one stream are serialised and run to the end even when the producer is
        cancelled meanwhile (a stop), so that Redis and the mirror never disagree about which
        frames exist: the producer's final frames then follow the last one written.
        """
        local = self._local[stream_id]

        async def run() -> None:
            async with local.writing:
                try:
                    async with self._client.pipeline(transaction=True) as pipe:
                        write(pipe, local)
                        pipe.publish(self._meta(stream_id), self.instance)
                        await pipe.execute()
                except _UNREACHABLE:
                    local.broken = True  # local readers must not wait for frames that cannot come
                    self._wake_local(self._meta(stream_id))
                    raise
                local.broken = False
                written(local)
                self._wake_local(self._meta(stream_id))

        task = asyncio.ensure_future(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # Should the producer be cancelled meanwhile, nobody awaits the task: read its outcome.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        await asyncio.shield(task)

    @_guarded
    async def set_running(self, stream_id: str) -> None:
        def write(pipe: Any, local: _LocalLog) -> None:
            pipe.hset(self._meta(stream_id), "state", StreamState.RUNNING.value)

        def written(local: _LocalLog) -> None:
            local.state = StreamState.RUNNING

        await self._write(stream_id, write, written)

    def _add_frames(self, pipe: Any, stream_id: str, frames: list[bytes]) -> None:
        seq = len(self._local[stream_id].frames)  # the writing lock keeps this exact
        for frame in frames:
            seq += 1
            pipe.xadd(self._log(stream_id), {"f": frame}, id=f"{seq}-0")
        if frames and seq == len(frames):  # the log's first entries: it exists from now on
            pipe.expire(self._log(stream_id), STREAM_MAX_AGE)

    def _wake_local(self, channel: str) -> None:
        # Readers in this process need not wait for the echo from Redis.
        for wake in self._watchers.get(channel, ()):
            wake()

    @_guarded
    async def append(self, stream_id: str, frames: list[bytes]) -> None:
        """Queue frames; one flusher writes what every stream here has queued in one pipeline.

        Under load the cost of a round trip is shared by all the frames written in it, so the
        cost per frame falls as the load rises. Readers here see frames once Redis has them
        (the mirror follows the writes). A producer waits only when it is MAX_QUEUED frames
        ahead of Redis; and a stop can never cut a write in two.
        """
        local = self._local[stream_id]
        if local.broken:
            raise StoreUnavailable()
        local.queued.extend(frames)
        local.drained.clear()
        self._dirty[stream_id] = local
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        if len(local.queued) > MAX_QUEUED:
            await local.drained.wait()
            if local.broken:
                raise StoreUnavailable()

    async def _flush(self) -> None:
        try:
            while self._dirty:
                batch, self._dirty = self._dirty, {}
                work = []
                for sid, local in batch.items():
                    if local.queued and not local.broken:
                        work.append((sid, local, local.queued))
                        local.queued = []
                    else:  # nothing to write, or Redis away: end_stream takes what is queued
                        local.drained.set()
                try:
                    async with self._client.pipeline(transaction=False) as pipe:
                        for sid, _local, frames in work:
                            self._add_frames(pipe, sid, frames)
                            pipe.publish(self._meta(sid), self.instance)
                        await pipe.execute()
                except _UNREACHABLE:
                    log.warning("redis unavailable: frames of %d stream(s) not written yet", len(work))
                    for _sid, local, frames in work:
                        local.broken = True
                        local.queued[:0] = frames  # kept in order: a Redis position is the frame's number
                else:
                    for _sid, local, frames in work:
                        local.frames.extend(frames)
                for sid, local, _frames in work:
                    if sid not in self._dirty:  # nothing new came for it meanwhile
                        local.drained.set()
                    self._wake_local(self._meta(sid))
        finally:
            self._flusher = None

    @_guarded
    async def end_stream(
        self,
        stream_id: str,
        state: StreamState,
        frames: list[bytes],
        retention: float,
        start_error: GatewayError | None = None,
    ) -> None:
        meta = self._meta(stream_id)
        local = self._local[stream_id]
        await local.drained.wait()  # the frames before these go first
        frames = [*local.queued, *frames]  # with any a failed flush left behind

        def write(pipe: Any, local: _LocalLog) -> None:
            self._add_frames(pipe, stream_id, frames)
            pipe.hset(meta, mapping={"state": state.value, "start_error": _error_to_json(start_error)})
            pipe.pexpire(meta, _ms(retention))
            pipe.pexpire(self._log(stream_id), _ms(retention))

        def written(local: _LocalLog) -> None:
            local.queued = []
            local.frames.extend(frames)
            local.state, local.start_error = state, start_error
            asyncio.get_running_loop().call_later(min(retention, LOCAL_LINGER), self._local.pop, stream_id, None)

        await self._write(stream_id, write, written)

    @_guarded
    async def read(self, stream_id: str, after: int) -> tuple[list[bytes], StreamInfo | None]:
        local = self._local.get(stream_id)
        if local is not None:
            info = self._local_info(stream_id, local)
            return local.frames[after : after + READ_BATCH], info
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xrange(self._log(stream_id), min=f"({after}-0" if after else "-", max="+", count=READ_BATCH)
            pipe.hgetall(self._meta(stream_id))
            pipe.xlen(self._log(stream_id))
            entries, fields, length = await pipe.execute()
        return [entry[b"f"] for _, entry in entries], self._info(stream_id, fields, length)

    @_guarded
    async def watch_stream(self, stream_id: str, wake: Wake) -> None:
        await self._watch(self._meta(stream_id), wake, local_only=stream_id in self._local)

    def unwatch_stream(self, stream_id: str, wake: Wake) -> None:
        self._unwatch(self._meta(stream_id), wake)

    @_guarded
    async def add_reader(self, stream_id: str) -> int:
        return int(await self._add_readers(keys=[self._meta(stream_id)], args=[1]))

    @_guarded
    async def remove_reader(self, stream_id: str) -> int:
        return int(await self._add_readers(keys=[self._meta(stream_id)], args=[-1]))

    @_guarded
    async def readers(self, stream_id: str) -> int:
        value = await self._client.hget(self._meta(stream_id), "readers")
        return int(value) if value is not None else 0

    # --- control bus -----------------------------------------------------------------------

    def on_control(self, handler: Callable[[str, str], None]) -> None:
        self._control = handler

    @_guarded
    async def send_control(self, instance: str, verb: str, stream_id: str) -> None:
        if instance == self.instance and self._control is not None:
            self._control(verb, stream_id)
        else:
            await self._client.publish(self._control_channel(instance), f"{verb} {stream_id}")

    # --- push messages -------------------------------------------------------------------

    @_guarded
    async def publish(self, user: str, event: str, data: bytes, retention: float, keep: int) -> str:
        key = self._events(user)
        oldest = f"{int((time.time() - retention) * 1000)}-0"
        self._keep = keep
        async with self._client.pipeline(transaction=True) as pipe:
            # The count cap is exact (a user gets at most `keep` old messages); the age trim may
            # be approximate, as reads filter by age anyway.
            pipe.xadd(key, {"e": event, "d": data}, maxlen=keep, approximate=False)
            pipe.xtrim(key, minid=oldest, approximate=True)
            pipe.pexpire(key, _ms(retention))
            pipe.publish(self._user_channel(user), self.instance)
            message_id, *_ = await pipe.execute()
        if user in self._users:
            self._spawn(self._refresh(user))
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
        self._wake_local(self._user_channel(user))

    @_guarded
    async def messages_after(self, user: str, after: str | None, retention: float) -> list[Message]:
        cache = self._users.get(user)
        if cache is not None and after is not None and message_id_key(after) >= message_id_key(cache.since):
            return newer_than(cache.messages, after, (time.time() - retention) * 1000)
        return await self._fetch(user, after, retention)

    @_guarded
    async def watch_user(self, user: str, wake: Wake) -> None:
        channel = self._user_channel(user)
        await self._watch(channel, wake)
        if user not in self._users and channel in self._watchers:
            # Subscribed first, then the newest id: every message after it will be notified.
            newest = await self._client.xrevrange(self._events(user), max="+", min="-", count=1)
            if user not in self._users:
                self._users[user] = _UserCache(newest[0][0].decode() if newest else "0-0")
                self._spawn(self._refresh(user))  # anything published between the two steps

    def unwatch_user(self, user: str, wake: Wake) -> None:
        channel = self._user_channel(user)
        self._unwatch(channel, wake)
        if channel not in self._watchers:
            self._users.pop(user, None)

    @_guarded
    async def cursor(self, user: str) -> str | None:
        value = await self._client.get(f"{self._prefix}user:{user}:cursor")
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
            async with self._client.pipeline(transaction=False) as pipe:
                for user, (message_id, retention) in writing.items():
                    await self._advance_cursor(keys=[f"{self._prefix}user:{user}:cursor"],
                                               args=[message_id, _ms(retention)], client=pipe)  # queued
                await pipe.execute()
            for user, entry in writing.items():
                if self._cursors.get(user) == entry:
                    del self._cursors[user]
        except _UNREACHABLE:
            log.warning("redis unavailable: push cursors not recorded yet")
            await asyncio.sleep(CURSOR_RETRY)
        finally:
            self._cursor_flush = None
            if self._cursors and not self._closing:
                self._cursor_flush = asyncio.ensure_future(self._flush_cursors())

    # --- counters for limits --------------------------------------------------------------

    @_guarded
    async def count_event(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        start = now - now % window
        name = f"{self._prefix}window:{key}:{start:.0f}"
        count, ttl_ms = await self._count_event(keys=[name], args=[_ms(start + window - now)])
        return int(count), max(0.0, int(ttl_ms) / 1000)

    @_guarded
    async def take_slot(self, key: str, member: str, limit: int, max_age: float) -> bool:
        now_ms = int(time.time() * 1000)
        taken = await self._take_slot(keys=[f"{self._prefix}slots:{key}"], args=[member, now_ms, _ms(max_age), limit])
        return bool(taken)

    @_guarded
    async def free_slot(self, key: str, member: str) -> None:
        await self._client.zrem(f"{self._prefix}slots:{key}", member)

    # --- keys with an expiry ---------------------------------------------------------------

    def _kv(self, key: str) -> str:
        return f"{self._prefix}kv:{key}"

    @_guarded
    async def put(self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False) -> bytes | None:
        if only_if_absent:
            # SET NX GET (Redis 7): sets when absent, and returns the live value otherwise.
            result: bytes | None = await self._client.set(self._kv(key), value, px=_ms(ttl), nx=True, get=True)
            return result
        await self._client.set(self._kv(key), value, px=_ms(ttl))
        return None

    @_guarded
    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self._client.get(self._kv(key))
        return value

    @_guarded
    async def delete(self, key: str) -> None:
        await self._client.delete(self._kv(key))

    @_guarded
    async def expire(self, key: str, ttl: float) -> None:
        await self._client.pexpire(self._kv(key), _ms(ttl))

    @_guarded
    async def ping(self) -> None:
        """Both connections work: commands, and the pub/sub that carries wake-ups."""
        await self._client.ping()
        if not await self._listener.usable():
            raise StoreUnavailable()

    @property
    def client(self) -> Any:
        """The process's Redis client (its one pool), for other parts that keep data in Redis."""
        return self._client

    async def close(self) -> None:
        if self._flusher is not None:
            await asyncio.wait([self._flusher], timeout=2)
        if self._cursor_flush is not None:  # record what was delivered, if Redis lets us soon
            await asyncio.wait([self._cursor_flush], timeout=1)
        self._closing = True
        if self._cursor_flush is not None:
            self._cursor_flush.cancel()
            await asyncio.gather(self._cursor_flush, return_exceptions=True)
        if self._background:  # let writes under way finish, briefly
            await asyncio.wait(list(self._background), timeout=2)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self._listener.close()
        await self._client.aclose()
