"""Pub/sub for the Redis store: the process's one pub/sub connection, and who waits on what.

Pub/sub carries only wake-ups, never data: a stream's channel and a user's channel say "look
again"; an instance's channel carries control messages to it. Readers always read from Redis by
position, so a wake-up lost during a reconnect costs latency, never a frame: once the connection
is back, every local waiter is woken to look again.

On a Redis Cluster, wake-ups use sharded pub/sub (SSUBSCRIBE/SPUBLISH): a message goes only to the
shard that owns its channel's slot (the stream's or the user's, by their hash tags), not to every
node. `ShardedListener` holds one such connection per shard that has a channel wanted here.

`Subscriptions` keeps one Redis subscription per channel however many wait on it here (in the
shared wake-up registry), and routes messages: a channel with a route of its own (the control
channel, user channels) goes there; for any other, a change this instance made itself (its
instance id as the message) is skipped, as its local waiters were woken when it was made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import StoreUnavailable, Wake
from ..local import Wakeups
from .connection import UNREACHABLE, node_url
from .slots import Address, SlotMap

__all__ = ["Listener", "ShardedListener", "Subscriptions"]

log = logging.getLogger("sse_gateway.store")

SUBSCRIBE_TIMEOUT = 5.0
RECONNECT_WAIT = 2.0  # seconds a request waits for a reconnect attempt of the pub/sub connection
MOVE_RETRY = 0.5  # seconds between readings of a cluster's slot map while a shard's connection is lost


class Listener:
    """The process's one pub/sub connection: confirmed subscriptions, reconnection, dispatch."""

    def __init__(self, client: Any, on_message: Callable[[str, bytes], None],
                 on_lost: Callable[[], None], on_back: Callable[[], None], *, sharded: bool = False) -> None:
        self._pubsub = client.pubsub()
        self._sharded = sharded  # SSUBSCRIBE, on a cluster node
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
                if self._sharded:
                    await self._pubsub.ssubscribe(channel)
                else:
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
                if self._sharded:
                    await self._pubsub.sunsubscribe(channel)
                else:
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
            kind = message["type"]
            if kind in ("subscribe", "ssubscribe"):
                for future in self._confirmations.pop(channel, []):
                    if not future.done():
                        future.set_result(None)
            elif kind in ("message", "smessage"):
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


class ShardedListener:
    """Pub/sub on a Redis Cluster: one sharded `Listener` per primary that owns a channel wanted
    here. When a shard's connection is lost, the slot map is read again and its channels move
    to their owners now (a replica promoted by a failover)."""

    def __init__(self, slots: SlotMap, url: str, on_message: Callable[[str, bytes], None],
                 on_lost: Callable[[], None], on_back: Callable[[], None]) -> None:
        self._slots = slots
        self._url = url
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_back = on_back
        self._listeners: dict[Address, tuple[Any, Listener]] = {}  # node -> its client, listener
        self._where: dict[str, Listener] = {}  # channel -> the listener subscribed to it
        self._moving: asyncio.Task[None] | None = None

    async def _owner(self, channel: str) -> Listener:
        address = await self._slots.owner(channel)
        if address not in self._listeners:
            client = aioredis.Redis.from_url(node_url(self._url, *address), socket_connect_timeout=2,
                                             socket_timeout=None, max_connections=2)
            self._listeners[address] = (client, Listener(client, self._on_message, self._lost, self._on_back,
                                                         sharded=True))
        return self._listeners[address][1]

    async def usable(self) -> bool:
        """True while any shard's connection works (or none is open yet): a shard that is down
        fails only the channels that live on it."""
        listeners = [listener for _client, listener in list(self._listeners.values())]
        return not listeners or any(await asyncio.gather(*(listener.usable() for listener in listeners)))

    async def subscribe(self, channel: str) -> None:
        try:
            listener = await self._owner(channel)
        except UNREACHABLE:
            raise StoreUnavailable() from None
        await listener.subscribe(channel)
        self._where[channel] = listener

    async def unsubscribe(self, channel: str) -> None:
        listener = self._where.pop(channel, None)
        if listener is not None:
            await listener.unsubscribe(channel)

    def _lost(self) -> None:
        self._on_lost()
        if self._moving is None:
            self._moving = asyncio.ensure_future(self._move())

    async def _move(self) -> None:
        """While a shard's connection stays lost, read the slot map again every MOVE_RETRY
        seconds; channels whose slot has a new owner (a replica promoted) are subscribed there,
        their waiters look again, and a listener left with no channel is closed."""
        try:
            while any(not listener.healthy for listener in self._where.values()):
                moved = False
                try:
                    await self._slots.refresh()
                    for channel, listener in list(self._where.items()):
                        owner = await self._owner(channel)
                        if owner is not listener and not listener.healthy:
                            # Not unsubscribed from the lost connection (each try would wait for
                            # it): that listener is closed once none of its channels is left.
                            await owner.subscribe(channel)
                            self._where[channel] = owner
                            moved = True
                except (*UNREACHABLE, RedisError, StoreUnavailable):
                    pass  # no new owner yet: try again
                if moved:
                    await self._close_unused()
                    self._on_back()
                await asyncio.sleep(MOVE_RETRY)
        finally:
            self._moving = None

    async def _close_unused(self) -> None:
        wanted = {id(listener) for listener in self._where.values()}
        for address, (client, listener) in list(self._listeners.items()):
            if id(listener) not in wanted:
                del self._listeners[address]
                await listener.close()
                await client.aclose()

    async def close(self) -> None:
        if self._moving is not None:
            self._moving.cancel()
            await asyncio.gather(self._moving, return_exceptions=True)
        for client, listener in self._listeners.values():
            await listener.close()
            await client.aclose()


Route = Callable[[str, bytes], None]


class Subscriptions:
    """Local wake-ups for Redis channels, over the one pub/sub connection."""

    def __init__(self, client: Any, instance: str, slots: SlotMap | None = None, cluster_url: str = "") -> None:
        self.instance = instance
        self._own = instance.encode()
        self._wakeups = Wakeups()
        self._subscribed: set[str] = set()
        self._routes: list[tuple[str, Route]] = []
        self._on_back: list[Callable[[], None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.listener: Listener | ShardedListener
        if slots is None:
            self.listener = Listener(client, self._dispatch, self.wake_all, self._back)
        else:
            self.listener = ShardedListener(slots, cluster_url, self._dispatch, self.wake_all, self._back)

    def route(self, prefix: str, handler: Route) -> None:
        """Messages on channels starting with `prefix` go to `handler(channel, data)`."""
        self._routes.append((prefix, handler))

    def on_back(self, callback: Callable[[], None]) -> None:
        """Have `callback` run when the pub/sub connection is back after a loss."""
        self._on_back.append(callback)

    async def subscribe(self, channel: str) -> None:
        """Subscribed for good (a channel routed here, say), confirmed by Redis."""
        if channel not in self._subscribed:
            self._subscribed.add(channel)
            try:
                await self.listener.subscribe(channel)
            except StoreUnavailable:
                self._subscribed.discard(channel)
                raise

    async def watch(self, channel: str, wake: Wake, *, local_only: bool = False) -> None:
        """Wake `wake` on changes of `channel`. `local_only`: every change is made here (a
        stream this instance produces), so no Redis subscription is needed."""
        self._wakeups.add(channel, wake)
        if local_only or channel in self._subscribed:
            return
        self._subscribed.add(channel)
        try:
            await self.listener.subscribe(channel)
        except StoreUnavailable:
            self._subscribed.discard(channel)
            self.unwatch(channel, wake)
            raise

    def unwatch(self, channel: str, wake: Wake) -> None:
        if self._wakeups.discard(channel, wake) and channel in self._subscribed:
            self.spawn(self._unsubscribe_if_idle(channel))

    def watched(self, channel: str) -> bool:
        return channel in self._wakeups

    async def _unsubscribe_if_idle(self, channel: str) -> None:
        if channel not in self._wakeups and channel in self._subscribed:
            self._subscribed.discard(channel)
            await self.listener.unsubscribe(channel)

    def wake(self, channel: str) -> None:
        """Local waiters on `channel` look again (a change this instance made)."""
        self._wakeups.wake(channel)

    def wake_all(self) -> None:
        """Every local waiter looks again: after a reconnect, or to find Redis gone."""
        self._wakeups.wake_all()

    def _dispatch(self, channel: str, data: bytes) -> None:
        for prefix, handler in self._routes:
            if channel.startswith(prefix):
                handler(channel, data)
                return
        if data != self._own:  # our own change: local waiters were woken when it was made
            self._wakeups.wake(channel)

    def _back(self) -> None:
        """Redis is back: notifications may have been lost, so look again everywhere."""
        for callback in self._on_back:
            callback()
        self.wake_all()

    def spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def usable(self) -> bool:
        return await self.listener.usable()

    async def close(self) -> None:
        if self._background:  # let work under way finish, briefly
            await asyncio.wait(list(self._background), timeout=2)
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.listener.close()
