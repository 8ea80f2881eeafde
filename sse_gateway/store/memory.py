"""The embedded store: everything in this process's memory (DESIGN.md §3, the default).

Expiry is exact for every lookup (an expired entry is never returned) and memory is released by
one janitor task that sleeps until the earliest expiry, rather than by a timer per entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Callable

from ..errors import GatewayError
from . import Store, StreamInfo, StreamState

__all__ = ["MemoryStore"]

log = logging.getLogger("sse_gateway.store")


class _Log:
    __slots__ = ("owner", "state", "frames", "start_error", "subscribers", "expires_at")

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.state = StreamState.PENDING
        self.frames: list[bytes] = []
        self.start_error: GatewayError | None = None
        self.subscribers: set[Callable[[], None]] = set()
        self.expires_at: float | None = None  # set when the stream ends

    def notify(self) -> None:
        for wake in self.subscribers:
            wake()


class MemoryStore(Store):
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._streams: dict[str, _Log] = {}
        self._keys: dict[str, tuple[bytes, float]] = {}
        self._expiries: list[tuple[float, str, str]] = []  # heap of (when, kind, name)
        self._janitor: asyncio.Task[None] | None = None
        self._earlier = asyncio.Event()  # an expiry earlier than the janitor's next one arrived
        self._empty = asyncio.Event()
        self._empty.set()
        self._streams_released = asyncio.Event()

    def __len__(self) -> int:
        """Streams and keys held, expired ones not yet released included."""
        return len(self._streams) + len(self._keys)

    async def wait_empty(self) -> None:
        """Until nothing is held any more (everything has ended and expired)."""
        await self._empty.wait()

    async def wait_empty_of_streams(self) -> None:
        """Until no stream is held any more (keys may remain)."""
        while self._streams:
            await self._streams_released.wait()

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
                try:
                    await asyncio.wait_for(self._earlier.wait(), delay)
                except TimeoutError:
                    pass
                continue
            _, kind, name = heapq.heappop(self._expiries)
            # The entry may have been given a new expiry, or deleted, since it was scheduled.
            if kind == "stream":
                self._stream(name)
            else:
                self._key(name)
        self._janitor = None

    def _released(self) -> None:
        if not self._streams:
            self._streams_released.set()
            self._streams_released = asyncio.Event()
            if not self._keys:
                self._empty.set()

    def _stream(self, stream_id: str) -> _Log | None:
        """The live stream, releasing it if it has expired."""
        stream = self._streams.get(stream_id)
        if stream is not None and stream.expires_at is not None and stream.expires_at <= self._clock():
            if stream.subscribers:  # a reader is still writing out its last frames
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

    async def create_stream(self, stream_id: str, owner: str) -> None:
        if stream_id in self._streams:
            raise ValueError(f"stream {stream_id} exists")
        self._streams[stream_id] = _Log(owner)
        self._empty.clear()

    async def stream_info(self, stream_id: str) -> StreamInfo | None:
        stream = self._stream(stream_id)
        if stream is None:
            return None
        return StreamInfo(stream_id, stream.owner, stream.state, len(stream.frames), stream.start_error)

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
        info = StreamInfo(stream_id, stream.owner, stream.state, len(stream.frames), stream.start_error)
        return stream.frames[after:], info

    def subscribe(self, stream_id: str, wake: Callable[[], None]) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.subscribers.add(wake)

    def unsubscribe(self, stream_id: str, wake: Callable[[], None]) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.subscribers.discard(wake)
            if not stream.subscribers and stream.expires_at is not None and stream.expires_at <= self._clock():
                self._stream(stream_id)  # it only waited for this reader

    # --- keys with an expiry ---------------------------------------------------------------

    async def put(self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False) -> bytes | None:
        if only_if_absent:
            existing = self._key(key)
            if existing is not None:
                return existing
        expires_at = self._clock() + ttl
        self._keys[key] = (value, expires_at)
        self._empty.clear()
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

    async def close(self) -> None:
        if self._janitor is not None:
            self._janitor.cancel()
            await asyncio.gather(self._janitor, return_exceptions=True)
            self._janitor = None
