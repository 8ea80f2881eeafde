"""The embedded store: everything in this process's memory (DESIGN.md §3, the default).

Expiry is exact for every lookup (an expired entry is never returned), and memory is released by
the entries' deadlines in one timer heap (`Deadlines`), not by a timer per entry. A stream's log
is a `LocalLog`: its readers follow it live.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import math
import secrets
import time
from collections.abc import Callable

from ..deadlines import Deadlines
from ..errors import GatewayError
from . import (
    READ_BATCH, ControlBus, Counters, Keys, Message, Store, StreamInfo, StreamLogs, StreamState, UserChannels, Wake,
    message_id_key, newer_than,
)
from .local import LocalLog, Wakeups

__all__ = ["MemoryStore"]

Clock = Callable[[], float]


class _Held:
    """What the memory store holds, so that a test can wait until everything has expired."""

    def __init__(self) -> None:
        self.count = 0
        self.empty = asyncio.Event()
        self.empty.set()

    def add(self) -> None:
        self.count += 1
        self.empty.clear()

    def remove(self) -> None:
        self.count -= 1
        if not self.count:
            self.empty.set()


class _Expiries:
    """When the entries of one part of the store expire: a heap of (when, name), and one deadline
    for its earliest. No object per entry, so that ten thousand ended streams kept for resume
    are nothing the cyclic garbage collector has to look at. `release(name)` drops the entry if
    it has really expired (an entry given a new lifetime is in the heap again, for later)."""

    __slots__ = ("_heap", "_release", "_janitor", "deadline_at")

    def __init__(self, janitor: Deadlines, release: Callable[[str], object]) -> None:
        self._heap: list[tuple[float, str]] = []
        self._release = release
        self._janitor = janitor
        self.deadline_at = math.inf

    def add(self, when: float, name: str) -> None:
        heapq.heappush(self._heap, (when, name))
        if when < self.deadline_at:
            self._janitor.add(when, self)

    def on_deadline(self, now: float) -> float | None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            self._release(heapq.heappop(heap)[1])
        return heap[0][0] if heap else None


class MemoryLogs(StreamLogs):
    """Logs in memory. Finished ones are kept for their retention, and within `max_retained`
    bytes in all (0: no cap): past it, the streams that finished first are dropped first."""

    def __init__(self, instance: str, janitor: Deadlines, held: _Held, max_retained: int = 0) -> None:
        self.instance = instance
        self.max_retained = max_retained
        self.retained_bytes = 0
        self._finished: dict[str, int] = {}  # finished streams' sizes, in the order they finished
        self._janitor = janitor
        self._held = held
        self._logs: dict[str, LocalLog] = {}
        self._readers: dict[str, int] = {}
        self._wakeups = Wakeups()
        self._expiries = _Expiries(janitor, self._release)

    def _log(self, stream_id: str) -> LocalLog | None:
        log = self._logs.get(stream_id)
        if log is not None and log.expires_at is not None and log.expires_at <= self._janitor.clock():
            self._release(stream_id)
            return None
        return log

    def _release(self, stream_id: str) -> float | None:
        log = self._logs.get(stream_id)
        if log is None or log.expires_at is None:
            return None
        if log.expires_at > self._janitor.clock():
            return log.expires_at
        del self._logs[stream_id]
        self._readers.pop(stream_id, None)
        self.retained_bytes -= self._finished.pop(stream_id, 0)
        self._held.remove()
        return None

    def _running(self, stream_id: str) -> LocalLog:
        log = self._logs.get(stream_id)
        if log is None:
            raise KeyError(stream_id)
        return log

    async def create(self, stream_id: str, owner: str, readers: int = 0, model: str = "",
                     prompt_tokens: int = 0) -> None:
        if stream_id in self._logs:
            raise ValueError(f"stream {stream_id} exists")
        self._logs[stream_id] = LocalLog(owner, self.instance)
        if readers:
            self._readers[stream_id] = readers
        self._held.add()

    async def info(self, stream_id: str) -> StreamInfo | None:
        log = self._log(stream_id)
        return log.info(stream_id) if log is not None else None

    async def set_running(self, stream_id: str, upstream: str = "") -> None:
        log = self._running(stream_id)
        log.upstream = upstream
        if log.state is StreamState.PENDING:
            log.state = StreamState.RUNNING
            self._wakeups.wake(stream_id)

    def append(self, stream_id: str, frames: list[bytes]) -> bool:
        self._running(stream_id).extend(frames)
        return True

    async def end(self, stream_id: str, state: StreamState, frames: list[bytes], retention: float,
                  start_error: GatewayError | None = None) -> None:
        log = self._running(stream_id)
        log.expires_at = self._janitor.clock() + retention
        log.finish(state, frames, start_error)
        self._expiries.add(log.expires_at, stream_id)
        size = sum(map(len, log.frames))
        self._finished[stream_id] = size
        self.retained_bytes += size
        self._wakeups.wake(stream_id)
        self._drop_oldest(keep=stream_id)

    def _drop_oldest(self, keep: str) -> None:
        """Within the cap again, the stream that just finished spared (its readers are on it)."""
        while self.max_retained and self.retained_bytes > self.max_retained and len(self._finished) > 1:
            oldest = next(iter(self._finished))
            if oldest == keep:
                break
            log = self._logs[oldest]
            log.expires_at = self._janitor.clock()
            self._release(oldest)

    async def read(self, stream_id: str, after: int) -> tuple[list[bytes], StreamInfo | None]:
        log = self._log(stream_id)
        if log is None:
            return [], None
        return list(log.frames[after : after + READ_BATCH]), log.info(stream_id)

    def local(self, stream_id: str) -> LocalLog | None:
        return self._log(stream_id)

    async def watch(self, stream_id: str, wake: Wake) -> None:
        self._wakeups.add(stream_id, wake)

    def unwatch(self, stream_id: str, wake: Wake) -> None:
        self._wakeups.discard(stream_id, wake)

    async def add_reader(self, stream_id: str) -> int:
        if stream_id not in self._logs:
            return 0
        count = self._readers[stream_id] = self._readers.get(stream_id, 0) + 1
        return count

    async def remove_reader(self, stream_id: str) -> int:
        if stream_id not in self._logs:
            return 0
        count = self._readers[stream_id] = max(0, self._readers.get(stream_id, 0) - 1)
        return count

    async def readers(self, stream_id: str) -> int:
        return self._readers.get(stream_id, 0) if stream_id in self._logs else 0

    def __len__(self) -> int:
        return len(self._logs)


class MemoryKeys(Keys):
    def __init__(self, janitor: Deadlines, held: _Held) -> None:
        self._janitor = janitor
        self._held = held
        self._values: dict[str, tuple[bytes, float]] = {}
        self._expiries = _Expiries(janitor, self._release)

    def _live(self, key: str) -> bytes | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[1] <= self._janitor.clock():
            self._release(key)
            return None
        return entry[0]

    def _release(self, key: str) -> float | None:
        entry = self._values.get(key)
        if entry is None:
            return None
        if entry[1] > self._janitor.clock():
            return entry[1]
        del self._values[key]
        self._held.remove()
        return None

    async def put(self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False) -> bytes | None:
        existing = self._live(key)
        if only_if_absent and existing is not None:
            return existing
        expires_at = self._janitor.clock() + ttl
        if key not in self._values:
            self._held.add()
        self._values[key] = (value, expires_at)
        self._expiries.add(expires_at, key)
        return None

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    def ttl_of(self, key: str) -> float | None:
        """Seconds `key` has left, or None when it is not held."""
        if self._live(key) is None:
            return None
        return self._values[key][1] - self._janitor.clock()

    async def delete(self, key: str) -> None:
        if self._values.pop(key, None) is not None:
            self._held.remove()

    async def expire(self, key: str, ttl: float) -> None:
        value = self._live(key)
        if value is not None:
            await self.put(key, value, ttl)

    def __len__(self) -> int:
        return len(self._values)


class MemoryCounters(Counters):
    def __init__(self, keys: MemoryKeys) -> None:
        self._keys = keys
        self._slots: dict[str, dict[str, float]] = {}  # key -> {holder: taken at}

    async def count_event(self, key: str, window: float) -> tuple[int, float]:
        now = time.time()
        start = now - now % window
        name = f"window:{key}:{start:.0f}"
        count = int(await self._keys.get(name) or b"0") + 1
        left = start + window - now
        await self._keys.put(name, str(count).encode(), left)
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

    async def add(self, key: str, amount: int, max_age: float, initial: int = 0) -> int:
        name = f"total:{key}"
        total = int(await self._keys.get(name) or str(initial).encode()) + amount
        ttl = self._keys.ttl_of(name)
        await self._keys.put(name, str(total).encode(), ttl if ttl is not None else max_age)
        return total

    async def free_slot(self, key: str, member: str) -> None:
        slots = self._slots.get(key)
        if slots is not None:
            slots.pop(member, None)
            if not slots:
                del self._slots[key]


class MemoryChannels(UserChannels):
    def __init__(self, keys: MemoryKeys, janitor: Deadlines, held: _Held) -> None:
        self._keys = keys
        self._janitor = janitor
        self._held = held
        self._channels: dict[str, collections.deque[Message]] = {}
        self._expiry: dict[str, float] = {}  # user -> when the newest message passes the retention
        self._wakeups = Wakeups()
        self._last_id = (0, 0)
        self._expiries = _Expiries(janitor, self._release)

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
            self._drop(user)
        return channel

    def _drop(self, user: str) -> None:
        if self._channels.pop(user, None) is not None:
            self._held.remove()
        self._expiry.pop(user, None)

    def _release(self, user: str) -> float | None:
        expiry = self._expiry.get(user)
        if expiry is None:
            return None
        if expiry > self._janitor.clock():
            return expiry
        self._drop(user)
        return None

    async def publish(self, user: str, event: str, data: bytes, retention: float, keep: int) -> str:
        message = Message(self._next_id(), event, data)
        channel = self._channels.get(user)
        if channel is None:
            channel = self._channels[user] = collections.deque()
            self._held.add()
        channel.append(message)
        while len(channel) > keep:
            channel.popleft()
        self._channel(user, retention)
        self._expiry[user] = self._janitor.clock() + retention
        self._expiries.add(self._expiry[user], user)
        self._wakeups.wake(user)
        return message.id

    async def messages_after(self, user: str, after: str | None, retention: float) -> list[Message]:
        return newer_than(self._channel(user, retention), after, (time.time() - retention) * 1000)

    async def watch(self, user: str, wake: Wake) -> None:
        self._wakeups.add(user, wake)

    def unwatch(self, user: str, wake: Wake) -> None:
        self._wakeups.discard(user, wake)

    async def cursor(self, user: str) -> str | None:
        value = await self._keys.get(f"cursor:{user}")
        return value.decode() if value is not None else None

    async def advance_cursor(self, user: str, message_id: str, retention: float) -> None:
        current = await self.cursor(user)
        if current is None or message_id_key(message_id) > message_id_key(current):
            await self._keys.put(f"cursor:{user}", message_id.encode(), retention)

    def __len__(self) -> int:
        return len(self._channels)


class MemoryControl(ControlBus):
    """One instance: a control message is a call."""

    def __init__(self, instance: str) -> None:
        self.instance = instance
        self._handler: Callable[[str, str], None] | None = None

    def on_control(self, handler: Callable[[str, str], None]) -> None:
        self._handler = handler

    async def send(self, instance: str, verb: str, stream_id: str) -> None:
        if self._handler is not None and instance == self.instance:
            self._handler(verb, stream_id)


class MemoryStore(Store):
    def __init__(self, clock: Clock = time.monotonic, retained_bytes: int = 0) -> None:
        self.instance = secrets.token_hex(6)
        self._janitor = Deadlines(resolution=0.01, clock=clock)
        self._held = _Held()
        self.keys = MemoryKeys(self._janitor, self._held)
        self.logs = MemoryLogs(self.instance, self._janitor, self._held, retained_bytes)
        self.channels = MemoryChannels(self.keys, self._janitor, self._held)
        self.counters = MemoryCounters(self.keys)
        self.control = MemoryControl(self.instance)

    def __len__(self) -> int:
        """Streams, channels and keys held, expired ones not yet released included."""
        return self._held.count

    async def wait_empty(self) -> None:
        """Until nothing is held any more (everything has ended and expired)."""
        await self._held.empty.wait()

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._janitor.close()
