"""Where shared state lives: a few small interfaces, one backend per engine (DESIGN.md §2, §4.2, §4.3).

As in encode/broadcaster, the URL picks the backend (`open_store`): no `--redis-url` gives the
memory store (embedded, one process); `redis://…` gives the Redis store, which several gateway
instances share. A store is five parts, and each service takes only the part it needs:

- `StreamLogs`: a stream's owner, state and producing instance, and its frames in order. Frames
  are kept already encoded (`id: <stream>:<seq>` + `data:` + blank line), so that readers only
  concatenate. One producer writes a stream; readers on any instance read it from any position.
  The streams produced here are also held in this process as `LocalLog`s, whose live readers get
  new frames pushed the moment they are committed. Ended streams expire `retention` seconds after
  the end; readers are counted across instances, for the resume grace.
- `UserChannels` (push): messages with unique, increasing ids, kept for a retention window, and
  each user's cursor (the last message delivered to any of the user's connections).
- `Keys`: values with an expiry (read tickets, sessions, idempotency keys).
- `Counters`: fixed-window counts and held slots, for limits.
- `ControlBus`: short messages to the instance that produces a stream (stop it; its readers came
  or went).

The engine-independent part lives once, in `local.py`: the local log record and the wake-up
registry. Every method may raise `StoreUnavailable` (a 503) when the backend cannot be reached.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import GatewayError

if TYPE_CHECKING:
    from .local import LocalLog

__all__ = [
    "ENDED", "READ_BATCH", "ControlBus", "Counters", "Keys", "Message", "Store", "StoreUnavailable", "StreamInfo",
    "StreamLogs", "StreamState", "UserChannels", "Wake", "message_id_key", "newer_than", "open_store",
]

Wake = Callable[[], None]
READ_BATCH = 1000  # frames or messages one read returns at most: replays come in slices


class StreamState(enum.Enum):
    PENDING = "pending"  # waiting for the upstream's response head
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = frozenset({StreamState.DONE, StreamState.FAILED, StreamState.CANCELLED})


class StoreUnavailable(GatewayError):
    def __init__(self) -> None:
        super().__init__(
            503,
            "The gateway's shared state store is unavailable; try again shortly.",
            type="server_error",
            code="store_unavailable",
            retry_after=1,
        )


@dataclass(frozen=True, slots=True)
class StreamInfo:
    id: str
    owner: str
    state: StreamState
    length: int  # frames in the log; the last one is [DONE] once the stream has ended
    instance: str = ""  # the gateway instance whose producer writes the stream
    # A failure before the upstream's head: the first reader can still answer with its status.
    start_error: GatewayError | None = None
    # Its producer's instance died: the log ends where it stopped, with no [DONE] of its own.
    lost: bool = False
    model: str = ""  # what the stream asked for, and its prompt's estimated tokens: what
    prompt_tokens: int = 0  # another instance records as its usage should its producer be lost
    upstream: str = ""  # the name of the upstream that answered (--upstreams), once it has

    @property
    def ended(self) -> bool:
        return self.state in ENDED


@dataclass(frozen=True, slots=True)
class Message:
    """One push message of a user's channel."""

    id: str  # "<milliseconds>-<sequence>": unique and increasing within the channel
    event: str
    data: bytes  # compact JSON


def message_id_key(message_id: str) -> tuple[int, int]:
    """Message ids in order: "<ms>-<seq>" compared as numbers."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)


def newer_than(messages: Iterable[Message], after: str | None, oldest_ms: float) -> list[Message]:
    """The messages after id `after` and not older than `oldest_ms`, from messages in id order.

    Scans from the newest end: a connection that keeps up asks for the last few messages only.
    """
    start = message_id_key(after) if after is not None else (-1, -1)
    newer = []
    for message in reversed(messages):  # type: ignore[call-overload]
        key = message_id_key(message.id)
        if key <= start or key[0] < oldest_ms:
            break
        newer.append(message)
    newer.reverse()
    return newer[:READ_BATCH]


class StreamLogs(abc.ABC):
    """Stream logs, written by one producer each and read from any position by any instance."""

    instance: str  # this process's instance id: the producer of the streams it creates
    retained_bytes: int = 0  # bytes of finished logs this process keeps in its own memory

    @abc.abstractmethod
    async def create(self, stream_id: str, owner: str, readers: int = 0, model: str = "",
                     prompt_tokens: int = 0) -> None:
        """A new, empty, PENDING stream, produced by this instance, with `readers` counted."""

    async def orphans(self) -> list[tuple[str, str]]:
        """(stream id, instance) of the streams still listed as produced by an instance whose
        lease has lapsed (it died)."""
        return []

    async def end_lost(self, stream_id: str, instance: str, retention: float) -> StreamInfo | None:
        """End a pending or running stream of `instance` as lost, if that instance's lease has
        lapsed; its state then, when this call ended it (once, whichever instance asks)."""
        return None

    @abc.abstractmethod
    async def info(self, stream_id: str) -> StreamInfo | None:
        """The stream's state, or None when it is unknown or has expired."""

    @abc.abstractmethod
    async def set_running(self, stream_id: str, upstream: str = "") -> None:
        """The upstream (named `upstream`) has answered: the stream is generating."""

    @abc.abstractmethod
    def append(self, stream_id: str, frames: list[bytes]) -> bool:
        """Add frames at the end of the log (by the stream's one producer), without waiting.

        They reach readers once committed. False asks the producer to stop reading its upstream
        until `on_drained` calls back: the store is that far behind.
        """

    def on_drained(self, stream_id: str, resume: Wake) -> None:  # noqa: B027 (a store that never says False)
        """Call `resume()` once what `append` queued for the stream is committed."""
        resume()

    @abc.abstractmethod
    async def end(
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
        """Frames after the first `after` ones (a bounded batch), and the stream's state then."""

    @abc.abstractmethod
    def local(self, stream_id: str) -> LocalLog | None:
        """The stream as this process holds it, for live readers; None when it is read from
        elsewhere (another instance produces it), or is unknown."""

    @abc.abstractmethod
    async def watch(self, stream_id: str, wake: Wake) -> None:
        """Call `wake()` whenever the stream changes, from any instance; live once this returns."""

    @abc.abstractmethod
    def unwatch(self, stream_id: str, wake: Wake) -> None: ...

    @abc.abstractmethod
    async def add_reader(self, stream_id: str) -> int:
        """Count one more reader (on any instance); return the count."""

    @abc.abstractmethod
    async def remove_reader(self, stream_id: str) -> int: ...

    @abc.abstractmethod
    async def readers(self, stream_id: str) -> int: ...


class UserChannels(abc.ABC):
    """Each user's push messages and delivery cursor."""

    @abc.abstractmethod
    async def publish(self, user: str, event: str, data: bytes, retention: float, keep: int) -> str:
        """Add a message to the user's channel (kept `retention` s, `keep` at most); its id."""

    @abc.abstractmethod
    async def messages_after(self, user: str, after: str | None, retention: float) -> list[Message]:
        """The user's messages after id `after` (all retained when None), a bounded batch."""

    @abc.abstractmethod
    async def watch(self, user: str, wake: Wake) -> None:
        """Call `wake()` whenever the user's channel gets a message; live once this returns."""

    @abc.abstractmethod
    def unwatch(self, user: str, wake: Wake) -> None: ...

    def when_back(self, wake: Wake) -> None:
        """Call `wake()` once, when the store, away now, is back (a channel opened meanwhile
        subscribes then). A store that is never away has nothing to wait for."""
        wake()

    def forget(self, wake: Wake) -> None:
        """Do not call `wake()` after all (its connection is gone)."""

    @abc.abstractmethod
    async def cursor(self, user: str) -> str | None:
        """The id of the last message delivered to any of the user's connections."""

    @abc.abstractmethod
    async def advance_cursor(self, user: str, message_id: str, retention: float) -> None:
        """Move the cursor to `message_id` unless it is already further."""


class Keys(abc.ABC):
    """Values that expire."""

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


class Counters(abc.ABC):
    """Counts for limits, shared by every instance."""

    @abc.abstractmethod
    async def count_event(self, key: str, window: float) -> tuple[int, float]:
        """Count one more event in the current `window`-second window of `key`: (count so far,
        seconds until the window ends). Windows are fixed, aligned to the clock."""

    @abc.abstractmethod
    async def take_slot(self, key: str, member: str, limit: int, max_age: float) -> bool:
        """Hold one of `limit` slots of `key` for `member` (holding it already counts as taken).
        Slots older than `max_age` seconds are freed first: a crashed holder leaks none."""

    @abc.abstractmethod
    async def free_slot(self, key: str, member: str) -> None: ...

    @abc.abstractmethod
    async def add(self, key: str, amount: int, max_age: float, initial: int = 0) -> int:
        """Add `amount` (may be negative) to the total of `key`, at once for every instance, and
        return the new total. A key not held starts at `initial`, and is forgotten `max_age`
        seconds later."""


class ControlBus(abc.ABC):
    """Short messages to the instance that produces a stream."""

    instance: str  # this process's instance id

    @abc.abstractmethod
    def on_control(self, handler: Callable[[str, str], None]) -> None:
        """Have `handler(verb, stream_id)` called for control messages sent to this instance."""

    @abc.abstractmethod
    async def send(self, instance: str, verb: str, stream_id: str) -> None: ...


class Store(abc.ABC):
    """The five parts of one backend, and its life."""

    logs: StreamLogs
    channels: UserChannels
    keys: Keys
    counters: Counters
    control: ControlBus

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailable unless the backend answers."""

    async def close(self) -> None:  # noqa: B027 (optional for backends with nothing to release)
        """Release connections and tasks."""


def open_store(url: str | None, retained_bytes: int = 0, lease: float = 10.0) -> Store:
    """The backend the URL names: None for the embedded memory store, `redis://…` for Redis.
    `retained_bytes` caps the finished logs the memory store keeps (0: no cap); Redis keeps
    them within its own `maxmemory`. `lease`: seconds after which an instance that stopped
    refreshing its lease in Redis is taken for dead."""
    if not url:
        from .memory import MemoryStore

        return MemoryStore(retained_bytes=retained_bytes)
    from .redis import RedisStore  # only deployments with Redis load redis-py

    return RedisStore(url, lease=lease)
