"""Delivery: what one connection reads, handed to its socket (DESIGN.md §5 steps 5 and 6).

A `Sink` is the write side of one event-stream response (handlers/wire.py on Tornado): it takes
bytes now, and says when it cannot take more until it has drained. A `Delivery` feeds one sink
from one source, in one of two ways:

- catching up: a task reads what is new in batches (a replay after Last-Event-ID, a stream
  produced on another instance, a user's push channel) and writes each batch whole, then ends.
  It runs only while there is something to send; `wake()` (the source changed) and `drained()`
  (the sink can take more) start it again. An idle connection holds no task and no future.
- live: a reader of a log this process holds (`LocalLog`) that has everything so far follows
  the log, which pushes every commit straight into the sink. A reader whose sink is full leaves
  the live set and catches up from the log once the sink has drained, so a slow client costs
  the log's memory, never a growing buffer of its own.

Ids and positions are the log's: replay and live reading are the same read from the same
position, so there is no seam at which a frame could be skipped or repeated.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from .errors import GatewayError, producer_lost, server_error
from .metrics import Metrics
from .store import READ_BATCH, StreamLogs
from .store.local import LocalLog

__all__ = ["Delivery", "LogDelivery", "Sink"]

log = logging.getLogger("sse_gateway.delivery")


class Sink(Protocol):
    def write(self, data: bytes) -> bool:
        """Send `data` now; False when nothing more should come until `Delivery.drained()`."""

    def finish(self) -> None:
        """End the response: everything has been delivered."""

    def fail(self, error: GatewayError) -> None:
        """End the response with `error` (its status is long sent: an error frame)."""


class _NoSink:
    def write(self, data: bytes) -> bool:
        raise RuntimeError("nothing to write to before the response head")

    def finish(self) -> None:
        pass

    def fail(self, error: GatewayError) -> None:
        pass


_NO_SINK = _NoSink()


class Delivery:
    """Feeds a sink from a source that subclasses read in `_fetch`."""

    __slots__ = ("sink", "done", "_task", "_again")

    def __init__(self) -> None:
        self.sink: Sink = _NO_SINK  # until the response head is out
        self.done = False  # everything delivered, or the connection gone
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def begin(self, sink: Sink) -> None:
        """The response head is out: deliver to `sink` from now on."""
        self.sink = sink
        self.wake()

    async def start(self, sink: Sink) -> None:
        """Start delivering to `sink` (subclasses may first subscribe to their source)."""
        self.begin(sink)

    def wake(self) -> None:
        """The source has something new (or may have): catch up, unless already at it."""
        if self.done or self.sink is _NO_SINK:
            return
        if self._task is not None:
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._catch_up())

    def drained(self) -> None:
        """The sink can take more."""
        self.wake()

    async def _catch_up(self) -> None:
        try:
            while not self.done:
                self._again = False
                data, ended = await self._fetch()
                if self.done:
                    return
                if data:
                    more = self.sink.write(data)
                    await self._delivered()
                    if not more:
                        return  # drained() comes back when the sink can take more
                if ended:
                    self.done = True
                    self.sink.finish()
                    return
                if not data and not self._again and self._caught_up():
                    return
        except GatewayError as error:
            # The head is out: the failure (the store gone, say) becomes an error frame.
            self._end_with(error)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery failed")
            self._end_with(server_error())
        finally:
            self._task = None

    def _end_with(self, error: GatewayError) -> None:
        if not self.done:
            self.done = True
            self.sink.fail(error)

    async def _fetch(self) -> tuple[bytes, bool]:
        """What is new, as bytes to write, and whether the source has ended."""
        raise NotImplementedError

    async def _delivered(self) -> None:
        """The last batch has been handed to the sink."""

    def _caught_up(self) -> bool:
        """Nothing new: True ends the task until the next wake-up."""
        return True

    def close(self) -> None:
        """The connection is gone (or done): deliver nothing more, hold nothing."""
        self.done = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()


class LogDelivery(Delivery):
    """One connection reading one stream's log from `position` on, then following it live."""

    __slots__ = ("logs", "stream_id", "position", "metrics", "_local", "_live", "_watching")

    def __init__(self, logs: StreamLogs, stream_id: str, position: int, metrics: Metrics) -> None:
        super().__init__()
        self.logs = logs
        self.stream_id = stream_id
        self.position = position  # how many frames this reader has been given
        self.metrics = metrics
        self._local: LocalLog | None = None
        self._live = False
        self._watching = False

    async def start(self, sink: Sink) -> None:
        """Start delivering to `sink`. A log this process holds is read and followed here; one
        produced elsewhere is read from the store whenever it changes."""
        self._local = local = self.logs.local(self.stream_id)
        if local is None:
            await self.logs.watch(self.stream_id, self.wake)
            self._watching = True
            self.begin(sink)
            return
        self.sink = sink
        # A log held here is read without waiting for anything: most readers are caught up at
        # once (a new stream's log is empty) and follow it, with no task started at all.
        if local.failure is None and len(local.frames) - self.position <= READ_BATCH and not local.ended:
            batch = local.frames[self.position :]
            self.position = len(local.frames)
            self.metrics.frames += len(batch)
            if batch and not sink.write(batch[0] if len(batch) == 1 else b"".join(batch)):
                return  # drained() brings it back
            local.follow(self)
            self._live = True
            return
        self.wake()

    async def _fetch(self) -> tuple[bytes, bool]:
        local = self._local
        if local is not None:  # no await: nothing can be committed between this read and following
            if local.failure is not None:
                raise local.failure
            frames = local.frames[self.position : self.position + READ_BATCH]
            length, ended = len(local.frames), local.ended
        else:
            frames, info = await self.logs.read(self.stream_id, self.position)
            if info is None:
                return b"", True  # expired meanwhile: nothing more will come
            length, ended = info.length, info.ended
            if info.lost and self.position + len(frames) >= length:
                self.position += len(frames)
                self.metrics.frames += len(frames)
                if frames:  # the frames first; the end (outside the log) with the next read
                    return (frames[0] if len(frames) == 1 else b"".join(frames)), False
                raise producer_lost()
        self.position += len(frames)
        self.metrics.frames += len(frames)
        data = frames[0] if len(frames) == 1 else b"".join(frames)
        return data, ended and self.position >= length

    def _caught_up(self) -> bool:
        if self._local is not None:
            self._local.follow(self)
            self._live = True
        return True

    # --- LiveReader: called by the LocalLog --------------------------------------------------

    def push(self, batch: bytes, start: int, end: int) -> bool:
        if self.done or self.position != start:
            self._live = False
            self.wake()
            return False
        self.position = end
        self.metrics.frames += end - start
        if self.sink.write(batch):
            return True
        self._live = False  # drained() brings it back through the log
        return False

    def log_changed(self) -> None:
        local = self._local
        if self.done or local is None:
            return
        local.unfollow(self)
        self._live = False
        if local.failure is None and local.ended and self.position >= len(local.frames):
            self.done = True
            self.sink.finish()
            return
        self.wake()

    def close(self) -> None:
        super().close()
        if self._live and self._local is not None:
            self._local.unfollow(self)
            self._live = False
        if self._watching:
            self._watching = False
            self.logs.unwatch(self.stream_id, self.wake)
