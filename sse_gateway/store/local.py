"""The engine-independent part of every store: the local log record and the wake-up registry.

`LocalLog` is a stream's log as this process holds it: every frame, in order, with the stream's
state. Its live readers are connections that have read everything so far; a commit hands them
the new frames at once, synchronously (DESIGN.md §5: when a reader is caught up, the producer's
bytes go straight to its socket), so a frame costs no wake-up, task or future per reader. A
reader that cannot take more (its socket is full) leaves the live set and catches up from the
log at its own pace. The memory store holds every stream this way; the Redis store holds the
streams this instance produces, and commits frames to the local log once Redis has them.

`Wakeups` is the one registry of who in this process waits on what (a stream's changes, a user's
channel), shared by the backends and by push.
"""

from __future__ import annotations

from typing import Protocol

from ..errors import GatewayError
from . import ENDED, StreamInfo, StreamState, Wake

__all__ = ["LiveReader", "LocalLog", "Wakeups"]


class LiveReader(Protocol):
    def push(self, batch: bytes, start: int, end: int) -> bool:
        """Frames `start`..`end` of the log, joined. False: push no more (the reader lags or left)."""

    def log_changed(self) -> None:
        """The log ended or failed: look again."""


class LocalLog:
    __slots__ = ("owner", "instance", "state", "frames", "start_error", "failure", "live", "expires_at", "upstream")

    def __init__(self, owner: str, instance: str) -> None:
        self.owner = owner
        self.instance = instance
        self.state = StreamState.PENDING
        self.frames: list[bytes] = []  # a tuple once the stream has ended
        self.start_error: GatewayError | None = None
        self.failure: GatewayError | None = None  # the store lost a write: what readers read last
        self.live: list[LiveReader] = []
        self.expires_at: float | None = None  # set when the stream ends (memory store)
        self.upstream = ""  # the upstream that answered (--upstreams), once it has

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def info(self, stream_id: str) -> StreamInfo:
        return StreamInfo(stream_id, self.owner, self.state, len(self.frames), self.instance, self.start_error,
                          upstream=self.upstream)

    def follow(self, reader: LiveReader) -> None:
        self.live.append(reader)

    def unfollow(self, reader: LiveReader) -> None:
        if reader in self.live:
            self.live.remove(reader)

    def extend(self, frames: list[bytes]) -> None:
        """Frames committed: on the log, and in the live readers' sockets."""
        start = len(self.frames)
        self.frames += frames
        live = self.live
        if not live:
            return
        batch = frames[0] if len(frames) == 1 else b"".join(frames)
        end = start + len(frames)
        if len(live) == 1:  # the common case, without a copy of the list
            reader = live[0]
            if not reader.push(batch, start, end) and live and live[0] is reader:
                live.pop()
            return
        for reader in tuple(live):
            if not reader.push(batch, start, end):
                self.unfollow(reader)

    def finish(self, state: StreamState, frames: list[bytes], start_error: GatewayError | None) -> None:
        """The last frames and the final state, at once. The frames are kept as a tuple from
        then on: nothing is added to an ended log, and a tuple of bytes is nothing the cyclic
        garbage collector looks at while the log is kept for resume."""
        self.extend(frames)
        self.frames = tuple(self.frames)  # type: ignore[assignment]
        self.state = state
        self.start_error = start_error
        self._changed()

    def fail(self, error: GatewayError) -> None:
        """The store could not keep this log: readers end with `error` rather than wait."""
        self.failure = error
        self._changed()

    def _changed(self) -> None:
        for reader in tuple(self.live):
            reader.log_changed()


class Wakeups:
    """key -> the callbacks of everything in this process waiting on it."""

    __slots__ = ("_waiting",)

    def __init__(self) -> None:
        self._waiting: dict[str, set[Wake]] = {}

    def add(self, key: str, wake: Wake) -> bool:
        """Register `wake`; True when it is the key's first (the backend may subscribe then)."""
        waiting = self._waiting.get(key)
        if waiting is None:
            self._waiting[key] = {wake}
            return True
        waiting.add(wake)
        return False

    def discard(self, key: str, wake: Wake) -> bool:
        """Forget `wake`; True when nothing waits on the key any more."""
        waiting = self._waiting.get(key)
        if waiting is None:
            return False
        waiting.discard(wake)
        if waiting:
            return False
        del self._waiting[key]
        return True

    def __contains__(self, key: str) -> bool:
        return key in self._waiting

    def wake(self, key: str) -> None:
        waiting = self._waiting.get(key)
        if waiting:
            for wake in tuple(waiting):
                wake()

    def wake_all(self) -> None:
        for waiting in tuple(self._waiting.values()):
            for wake in tuple(waiting):
                wake()
