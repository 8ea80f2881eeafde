"""The embedded store: everything in this process's memory (DESIGN.md §3, the default).

Expiry is exact for every lookup (an expired entry is never returned) and memory is released by
one janitor task that sleeps until the earliest expiry, rather than by a timer per entry.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import logging
import secrets
import time
from collections.abc import Callable

from ..errors import GatewayError
from . import READ_BATCH, Message, Store, StreamInfo, StreamState, Wake, message_id_key, newer_than

__all__ = ["MemoryStore"]

log = logging.getLogger("sse_gateway.store")


class _Log:
    __slots__ = ("owner", "instance", "state", "frames", "start_error", "watchers", "readers", "expires_at")

    def __init__(self, owner: str, instance: str) -> None:
        self.owner = owner
        self.instance = instance
        self.state = StreamState.PENDING
        self.frames: list[bytes] = []
        self.start_error: GatewayError | None = None
        self.watchers: set[Wake] = set()
        self.readers = 0
        self.expires_at: float | None = None  # set when the stream ends

    def info(self, stream_id: str) -> StreamInfo:
        return StreamInfo(stream_id, self.owner, self.state, len(self.frames), self.instance, self.start_error)

    def notify(self) -> None:
        for wake in self.watchers:
            wake()


class MemoryStore(Store):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.instance = secrets.token_hex(6)
        self._clock = clock
        self._streams: dict[str, _Log] = {}
        self._keys: dict[str, tuple[bytes, float]] = {}
        self._channels: dict[str, collections.deque[Message]] = {}
        self._channel_expiry: dict[str, float] = {}
        self._slots: dict[str, dict[str, float]] = {}  # key -> {holder: taken at}
        self._user_watchers: dict[str, set[Wake]] = {}
        self._last_id = (0, 0)
        self._control: Callable[[str, str], None] | None = None
        self._expiries: list[tuple[float, str, str]] = []  # heap of (when, kind, name)
        self._janitor: asyncio.Task[None] | None = None
        self._earlier = asyncio.Event()  # an expiry earlier than the janitor's next one arrived
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        """Streams, channels and keys held, expired ones not yet released included."""
        return len(self._streams) + len(self._keys) + len(self._channels)

    async def wait_empty(self) -> None:
        """Until nothing is held any more (everything has ended and expired)."""
        await self._empty.wait()

    # --- expiry ----------------------------------------------------------------------------

    def _schedule(self, when: float, kind: str, name: str) -> None:
        earliest = self._expiries[0][0] if self._expiries else None
        heapq.heappush(self._expiries, (when, kind, name))
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._run_janitor(), name="store-janitor")
        elif earliest is None or when < earliest:
            self._earlier.set()

    async def _run_janitor(self) -> None:
        while self._expiries:
            delay = self._expiries[0][0] - self._clock()
            if delay > 0:
                self._earlier.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._earlier.wait(), delay)
                continue
            _, kind, name = heapq.heappop(self._expiries)
            # The entry may have been given a new expiry, or deleted, since it was scheduled.
            if kind == "stream":
                self._stream(name)
            elif kind == "channel":
                self._channel_expired(name)
            else:
                self._key(name)
        self._janitor = None

    def _released(self) -> None:
        if not self._streams and not self._keys and not self._channels:
            self._empty.set()

    def _held(self) -> None:
        self._empty.clear()

    def _stream(self, stream_id: str) -> _Log | None:
        """The live stream, releasing it if it has expired."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.expires_at is not None and stream.expires_at <= self._clock():
            if stream.watchers:  # a reader is still writing out its last frames
                return stream
            del self._streams[stream_id]
            self._released()
            return None
        return stream

    def _key(self, key: str) -> bytes | None:
        entry = self._keys.get(key)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._keys[key]
            self._released()
            return None
        return entry[0]

    # --- stream logs -----------------------------------------------------------------------

    async def create_stream(self, stream_id: str, owner: str, instance: str) -> None:
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id} exists")
        self._streams[stream_id] = _Log(owner, instance)
        self._held()

    async def stream_info(self, stream_id: str) -> StreamInfo | None:
        stream = self._stream(stream_id)
        return stream.info(stream_id) if stream is not None else None

    async def set_running(self, stream_id: str) -> None:
        stream = self._streams[stream_id]
        if stream.state is StreamState.PENDING:
            stream.state = StreamState.RUNNING
            stream.notify()

    async def append(self, stream_id: str, frames: list[bytes]) -> None:
        stream = self._streams[stream_id]
        stream.frames.extend(frames)
        stream.notify()

    async def end_stream(
        self,
        stream_id: str,
        state: StreamState,
        frames: list[bytes],
        retention: float,
        start_error: GatewayError | None = None,
    ) -> None:
        stream = self._streams[stream_id]
        stream.frames.extend(frames)
        stream.state = state
        stream.start_error = start_error
        stream.expires_at = self._clock() + retention
        self._schedule(stream.expires_at, "stream", stream_id)
        stream.notify()

    async def read(self, stream_id: str, after: int) -> tuple[list[bytes], StreamInfo | None]:
        stream = self._stream(stream_id)
        if stream is None:
            return [], None
        return stream.frames[after : after + READ_BATCH], stream.info(stream_id)

    async def watch_stream(self, stream_id: str, wake: Wake) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.watchers.add(wake)

    def unwatch_stream(self, stream_id: str, wake: Wake) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.watchers.discard(wake)
            if not stream.watchers and stream.expires_at is not None and stream.expires_at <= self._clock():
                self._stream(stream_id)  # it only waited for this reader

    async def add_reader(self, stream_id: str) -> int:
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        stream.readers += 1
        return stream.readers

    async def remove_reader(self, stream_id: str) -> int:
        stream = self._streams.get(stream_id)
        if stream is None:
            return 0
        stream.readers = max(0, stream.readers - 1)
        return stream.readers

    async def readers(self, stream_id: str) -> int:
        stream = self._streams.get(stream_id)
        return stream.readers if stream is not None else 0

    # --- control bus: one instance, so a message is a call ------------------------------

    def on_control(self, handler: Callable[[str, str], None]) -> None:
        self._control = handler

    async def send_control(self, instance: str, verb: str, stream_id: str) -> None:
        if self._control is not None and instance == self.instance:
            self._control(verb, stream_id)

    # --- push messages -----------------------------------------------------------------------

    def _next_id(self) -> str:
        ms, seq = int(time.time() * 1000), 0
        if ms <= self._last_id[0]:
            ms, seq = self._last_id[0], self._last_id[1] + 1
        self._last_id = (ms, seq)
        return f"{ms}-{seq}"

    def _channel(self, user: str, retention: float) -> collections.deque[Message]:
        """The user's channel, without the messages older than `retention` seconds."""
        channel = self._channels.get(user)
        if channel is None:
            return collections.deque()
        oldest_ms = (time.time() - retention) * 1000
        while channel and message_id_key(channel[0].id)[0] < oldest_ms:
            channel.popleft()
        if not channel:
            self._drop_channel(user)
        return channel

    def _drop_channel(self, user: str) -> None:
        self._channels.pop(user, None)
        self._channel_expiry.pop(user, None)
        self._released()

    def _channel_expired(self, user: str) -> None:
        """The janitor: a channel whose newest message is past the retention goes."""
        expiry = self._channel_expiry.get(user)
        if expiry is not None and expiry <= self._clock():
            self._drop_channel(user)

    async def publish(self, user: str, event: str, data: bytes, retention: float, keep: int) -> str:
        message = Message(self._next_id(), event, data)
        channel = self._channels.setdefault(user, collections.deque())
        channel.append(message)
        while len(channel) > keep:
            channel.popleft()
        self._held()
        self._channel(user, retention)
        self._channel_expiry[user] = self._clock() + retention
        self._schedule(self._channel_expiry[user], "channel", user)
        for wake in self._user_watchers.get(user, ()):
            wake()
        return message.id

    async def messages_after(self, user: str, after: str | None, retention: float) -> list[Message]:
        channel = self._channel(user, retention)
        return newer_than(channel, after, (time.time() - retention) * 1000)

    async def watch_user(self, user: str, wake: Wake) -> None:
        self._user_watchers.setdefault(user, set()).add(wake)

    def unwatch_user(self, user: str, wake: Wake) -> None:
        watchers = self._user_watchers.get(user)
        if watchers is not None:
            watchers.discard(wake)
            if not watchers:
                del self._user_watchers[user]

    async def cursor(self, user: str) -> str | None:
        value = self._key(f"cursor:{user}")
        return value.decode() if value is not None else None

    async def advance_cursor(self, user: str, message_id: str, retention: float) -> None:
        current = await self.cursor(user)
        if current is None or message_id_key(message_id) > message_id_key(current):
            await self.put(f"cursor:{user}", message_id.encode(), retention)

    # --- counters for limits --------------------------------------------------------------

    async def count_event(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        start = now - now % window
        name = f"window:{key}:{start:.0f}"
        count = int(self._key(name) or b"0") + 1
        left = start + window - now
        await self.put(name, str(count).encode(), left)
        return count, left

    async def take_slot(self, key: str, member: str, limit: int, max_age: float) -> bool:
        now = time.time()
        slots = self._slots.setdefault(key, {})
        for holder in [h for h, taken in slots.items() if taken <= now - max_age]:
            del slots[holder]
        if member not in slots and len(slots) >= limit:
            return False
        slots[member] = now
        return True

    async def free_slot(self, key: str, member: str) -> None:
        slots = self._slots.get(key)
        if slots is not None:
            slots.pop(member, None)
            if not slots:
                del self._slots[key]

    # --- keys with an expiry ---------------------------------------------------------------

    async def put(self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False) -> bytes | None:
        if only_if_absent:
            existing = self._key(key)
            if existing is not None:
                return existing
        expires_at = self._clock() + ttl
        self._keys[key] = (value, expires_at)
        self._held()
        self._schedule(expires_at, "key", key)
        return None

    async def get(self, key: str) -> bytes | None:
        return self._key(key)

    async def delete(self, key: str) -> None:
        if self._keys.pop(key, None) is not None:
            self._released()

    async def expire(self, key: str, ttl: float) -> None:
        value = self._key(key)
        if value is not None:
            expires_at = self._clock() + ttl
            self._keys[key] = (value, expires_at)
            self._schedule(expires_at, "key", key)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)
            self._janitor = None
