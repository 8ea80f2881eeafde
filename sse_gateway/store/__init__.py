"""Where stream logs and short-lived keys live: one interface, one backend per engine.

As in encode/broadcaster, the backend is chosen by URL: no `--redis-url` gives `MemoryStore`
(embedded, one process). A backend keeps two kinds of things:

- stream logs: a stream's owner and state, and its frames in order. Frames are stored already
  encoded (`id: <stream>:<seq>` + `data:` + blank line), so that readers only concatenate. One
  producer writes a stream; any number of readers read it, from any position, and are woken
  through `subscribe()` when it changes. Ended streams expire `retention` seconds after the end.
- keys with an expiry (read tickets, sessions, idempotency keys): bytes under a string key.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import GatewayError

__all__ = ["Store", "StreamInfo", "StreamState", "ENDED"]


class StreamState(enum.Enum):
    PENDING = "pending"  # waiting for the upstream's response head
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = frozenset({StreamState.DONE, StreamState.FAILED, StreamState.CANCELLED})


@dataclass(frozen=True)
class StreamInfo:
    id: str
    owner: str
    state: StreamState
    length: int  # frames in the log; the last one is [DONE] once the stream has ended
    # A failure before the upstream's head: the first reader can still answer with its status.
    start_error: GatewayError | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED


class Store(abc.ABC):
    # --- stream logs ---------------------------------------------------------------------

    @abc.abstractmethod
    async def create_stream(self, stream_id: str, owner: str) -> None:
        """A new, empty, PENDING stream."""

    @abc.abstractmethod
    async def stream_info(self, stream_id: str) -> StreamInfo | None:
        """The stream's state, or None when it is unknown or has expired."""

    @abc.abstractmethod
    async def set_running(self, stream_id: str) -> None: ...

    @abc.abstractmethod
    async def append(self, stream_id: str, frames: list[bytes]) -> None:
        """Add frames at the end of the log (by the stream's one producer)."""

    @abc.abstractmethod
    async def end_stream(
        self,
        stream_id: str,
        state: StreamState,
        frames: list[bytes],
        retention: float,
        start_error: GatewayError | None = None,
    ) -> None:
        """Append the last frames and set the final state at once; expire after `retention`."""

    @abc.abstractmethod
    async def read(self, stream_id: str, after: int) -> tuple[list[bytes], StreamInfo | None]:
        """The frames after the first `after` ones, and the stream's state when they were read."""

    @abc.abstractmethod
    def subscribe(self, stream_id: str, wake: Callable[[], None]) -> None:
        """Call `wake()` whenever the stream gets frames or changes state."""

    @abc.abstractmethod
    def unsubscribe(self, stream_id: str, wake: Callable[[], None]) -> None: ...

    # --- keys with an expiry ---------------------------------------------------------------

    @abc.abstractmethod
    async def put(self, key: str, value: bytes, ttl: float, *, only_if_absent: bool = False) -> bytes | None:
        """Store `value` for `ttl` seconds. With `only_if_absent`, keep (and return) a live value."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None: ...

    @abc.abstractmethod
    async def delete(self, key: str) -> None: ...

    @abc.abstractmethod
    async def expire(self, key: str, ttl: float) -> None:
        """Give a live key a new time to live."""

    async def close(self) -> None:
        """Release connections and tasks."""
