"""Streams: one answer's event log, apart from the connections that read it (DESIGN.md §5).

A `Stream` holds the frames produced so far, already encoded with their ids
`<stream id>:<seq>` (seq counts from 1), so that every reader shares the same bytes. The
producer appends; each connection reads through a `Reader`, which remembers how far it got and
owns the one future its writer sleeps on. Anything that concerns the writer (a new frame, the
end of the stream, a heartbeat due, the client gone) resolves that future; the writer then
takes everything ready at once, so one flush carries all the frames waiting (§5 step 5).

The registry ties streams to their producer tasks. Until resumable streams arrive, a stream
whose last reader leaves has its producer cancelled at once (a resume grace of zero).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Coroutine
from typing import Any

from .errors import GatewayError
from .frames import DONE_DATA, PING, encode_event

__all__ = ["Stream", "StreamState", "Reader", "StreamRegistry"]

log = logging.getLogger("sse_gateway.streams")


class StreamState(enum.Enum):
    PENDING = "pending"  # waiting for the upstream's response head
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


ENDED = frozenset({StreamState.DONE, StreamState.FAILED, StreamState.CANCELLED})


class Stream:
    def __init__(self, stream_id: str, owner: str) -> None:
        self.id = stream_id
        self.owner = owner
        self.state = StreamState.PENDING
        self.error: GatewayError | None = None
        self.start_error: GatewayError | None = None  # failed before the upstream's head arrived
        self.frames: list[bytes] = []
        self.readers: set[Reader] = set()
        self.producer: asyncio.Task[None] | None = None
        self.created = time.monotonic()

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def _notify(self) -> None:
        for reader in self.readers:
            reader.wake()

    def _append(self, data: bytes) -> None:
        self.frames.append(encode_event(data, id=f"{self.id}:{len(self.frames) + 1}"))

    def mark_running(self) -> None:
        """The upstream accepted the request: the response head may be committed."""
        if self.state is StreamState.PENDING:
            self.state = StreamState.RUNNING
            self._notify()

    def push(self, data: bytes) -> None:
        """Append one data frame (a chunk's JSON, as the upstream sent it)."""
        if self.ended:
            raise RuntimeError(f"stream {self.id} has ended")
        self._append(data)
        self._notify()

    def _end(self, state: StreamState, error: GatewayError | None = None) -> bool:
        if self.ended:
            return False
        if error is not None:
            self.error = error
            if self.state is StreamState.PENDING:
                self.start_error = error
            self._append(error.to_json())
        self._append(DONE_DATA)
        self.state = state
        self._notify()
        return True

    def finish(self) -> None:
        self._end(StreamState.DONE)

    def fail(self, error: GatewayError) -> None:
        """End with an OpenAI-shaped error frame, then [DONE] (DESIGN.md §4.1)."""
        self._end(StreamState.FAILED, error)

    def cancel(self) -> None:
        """End with what was produced so far and [DONE], and stop the producer."""
        if self._end(StreamState.CANCELLED) and self.producer is not None:
            self.producer.cancel()


class Reader:
    """One connection's position in a stream, and the future its writer waits on."""

    def __init__(self, stream: Stream, position: int = 0) -> None:
        self.stream = stream
        self.position = position  # how many frames this reader has been given
        self.closed = False
        self.last_write = time.monotonic()
        self._heartbeat_due = False
        self._wake: asyncio.Future[None] | None = None

    def wake(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def request_heartbeat(self) -> None:
        self._heartbeat_due = True
        self.wake()

    def close(self) -> None:
        """The connection is gone (or done): wake the writer so that it stops."""
        self.closed = True
        self.wake()

    async def _sleep(self) -> None:
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    async def wait_until_started(self) -> GatewayError | None:
        """Wait for the upstream's head, a failure before it, or one heartbeat interval.

        Returns the error when the stream failed before it started (its status can still be
        ours); None when the response head should be committed now.
        """
        while not self.closed:
            if self.stream.start_error is not None:
                return self.stream.start_error
            if self.stream.state is not StreamState.PENDING or self._heartbeat_due:
                return None
            await self._sleep()
        return None

    async def next_batch(self) -> bytes | None:
        """All frames ready to send as one buffer, or a heartbeat; None once there is no more."""
        while not self.closed:
            frames = self.stream.frames
            if self.position < len(frames):
                batch = frames[self.position] if self.position + 1 == len(frames) else b"".join(frames[self.position :])
                self.position = len(frames)
                return self._sent(batch)
            if self.stream.ended:
                return None
            if self._heartbeat_due:
                return self._sent(PING)
            await self._sleep()
        return None

    def _sent(self, data: bytes) -> bytes:
        self._heartbeat_due = False
        self.last_write = time.monotonic()
        return data


class StreamRegistry:
    """Running streams by id, and the producer task of each."""

    def __init__(self) -> None:
        self._streams: dict[str, Stream] = {}
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._streams)

    def get(self, stream_id: str) -> Stream | None:
        return self._streams.get(stream_id)

    def create(self, owner: str) -> Stream:
        stream = Stream(secrets.token_urlsafe(12), owner)
        self._streams[stream.id] = stream
        self._idle.clear()
        return stream

    def attach(self, stream: Stream, position: int = 0) -> Reader:
        reader = Reader(stream, position)
        stream.readers.add(reader)
        return reader

    def detach(self, reader: Reader) -> None:
        """The reader's connection is gone; a stream nobody reads is stopped (grace 0)."""
        reader.close()
        stream = reader.stream
        stream.readers.discard(reader)
        if not stream.readers:
            if not stream.ended:
                log.info("stream %s: last reader left; cancelling the upstream request", stream.id)
                stream.cancel()
            self._forget(stream)

    def start(self, stream: Stream, producer: Coroutine[Any, Any, None]) -> None:
        """Run the producer for `stream`; call after the first reader is attached (§5 step 2)."""
        stream.producer = asyncio.get_running_loop().create_task(producer, name=f"produce-{stream.id}")
        stream.producer.add_done_callback(lambda task: self._produced(stream, task))

    def _produced(self, stream: Stream, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("stream %s: producer crashed", stream.id, exc_info=task.exception())
        if not stream.readers:
            self._forget(stream)

    def _forget(self, stream: Stream) -> None:
        if stream.producer is None or stream.producer.done():
            self._streams.pop(stream.id, None)
            if not self._streams:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream runs, for at most `timeout` seconds; True if none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop every stream still running (at shutdown, after the drain)."""
        producers = [s.producer for s in self._streams.values() if s.producer is not None]
        for stream in list(self._streams.values()):
            stream.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        self._streams.clear()
        self._idle.set()
