"""Streams that outlive their connections (DESIGN.md §4.2, §5).

A stream's frames go into its log in the store; any connection reads the log from a position
(replay), then follows it live, through a `Reader`. Replay and live reading are the same read
from the same position, so there is no seam at which a frame could be skipped or repeated.

The registry runs the producers and applies the rules of §4.2: stopping is explicit (`stop`);
when the last reader of a running stream leaves, the stream keeps generating for
`resume_grace` seconds so that a reconnect can resume it, then its upstream request is
cancelled; a stream nobody ever opens is cancelled `resume_grace` seconds after its creation
(`FIRST_OPEN_WINDOW` at the least: the browser needs a moment to open the ticket URL).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .access import IdempotencyKeys, fingerprint
from .errors import GatewayError, bad_request
from .frames import PING
from .limits import Limiter
from .metrics import Metrics
from .producer import SHUTDOWN, LogPolicy, produce
from .store import Store, StoreUnavailable, StreamInfo, StreamState
from .upstream import UpstreamClient
from .usage import Prices, UsageBook, UsageMeter

__all__ = ["Follower", "Reader", "StreamRegistry", "parse_last_event_id", "new_stream_id"]

log = logging.getLogger("sse_gateway.streams")

# The least time a new stream waits for its first reader (POST /v1/streams, then the GET).
FIRST_OPEN_WINDOW = 5.0
STOP_TIMEOUT = 5.0  # seconds a stop waits for another instance's producer to end the stream
_EVENT_ID = re.compile(r"([A-Za-z0-9_-]{1,64}):(\d{1,12})")


def new_stream_id() -> str:
    return secrets.token_urlsafe(12)


def parse_last_event_id(value: str, info: StreamInfo) -> int:
    """How many frames a reader holding event id `value` has; 400 when it is not of this log."""
    match = _EVENT_ID.fullmatch(value)
    if match is None:
        raise bad_request("Last-Event-ID is malformed; expected <stream id>:<sequence number>.",
                          param="Last-Event-ID", code="invalid_last_event_id")
    stream_id, seq = match.group(1), int(match.group(2))
    if stream_id != info.id:
        raise bad_request("Last-Event-ID belongs to another stream.", param="Last-Event-ID",
                          code="invalid_last_event_id")
    if seq > info.length:
        raise bad_request("Last-Event-ID is beyond the end of the stream.", param="Last-Event-ID",
                          code="invalid_last_event_id")
    return seq


class Follower:
    """One connection's view of a log, and the one future its writer waits on.

    Anything that concerns the writer (the log changed, a heartbeat is due, the client is gone)
    calls `wake()`. A wake that arrives while the writer is busy is remembered, so that the
    writer looks again before it sleeps. Subclasses say how to fetch what is new.
    """

    def __init__(self) -> None:
        self.closed = False
        self.last_write = time.monotonic()
        self.writing_since: float | None = None  # the writer's write in progress, if any
        self.on_write_timeout: Callable[[], None] | None = None
        self._heartbeat_due = False
        self._dirty = False
        self._wake: asyncio.Future[None] | None = None

    def wake(self) -> None:
        self._dirty = True
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def request_heartbeat(self) -> None:
        self._heartbeat_due = True
        self.wake()

    def write_timed_out(self) -> None:
        """The sweeper found a write waiting longer than --write-timeout."""
        self.writing_since = None
        if self.on_write_timeout is not None:
            self.on_write_timeout()

    def close(self) -> None:
        """The connection is gone (or done): wake the writer so that it stops."""
        if not self.closed:
            self.closed = True
            self._release()
            self.wake()

    def _release(self) -> None:
        """Stop being woken by the store."""

    async def _sleep(self) -> None:
        if self._dirty:
            return
        self._wake = asyncio.get_running_loop().create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    async def _fetch(self) -> tuple[bytes, bool]:
        """What is new, as bytes to write, and whether the log has ended."""
        raise NotImplementedError

    async def next_batch(self) -> bytes | None:
        """All frames ready to send as one buffer, or a heartbeat; None once there is no more."""
        while not self.closed:
            self._dirty = False
            batch, ended = await self._fetch()
            if batch:
                return self._sent(batch)
            if ended:
                return None
            if self._heartbeat_due:
                return self._sent(PING)
            await self._sleep()
        return None

    async def delivered(self) -> None:
        """The last batch has been handed to the client's socket."""

    def _sent(self, data: bytes) -> bytes:
        self._heartbeat_due = False
        self.last_write = time.monotonic()
        return data


class Reader(Follower):
    """A reader of one stream's log, from `position` on."""

    def __init__(self, store: Store, stream_id: str, position: int) -> None:
        super().__init__()
        self.store = store
        self.stream_id = stream_id
        self.position = position  # how many frames this reader has been given

    async def start(self) -> None:
        await self.store.watch_stream(self.stream_id, self.wake)

    def _release(self) -> None:
        self.store.unwatch_stream(self.stream_id, self.wake)

    async def wait_until_started(self) -> GatewayError | None:
        """Wait for the upstream's head, a failure before it, or one heartbeat interval.

        Returns the error when the stream failed before it started (its status can still be
        ours); None when the response head should be committed now.
        """
        while not self.closed:
            self._dirty = False
            info = await self.store.stream_info(self.stream_id)
            if info is None:
                return None
            if info.start_error is not None:
                return info.start_error
            if info.state is not StreamState.PENDING or self._heartbeat_due:
                return None
            await self._sleep()
        return None

    async def _fetch(self) -> tuple[bytes, bool]:
        frames, info = await self.store.read(self.stream_id, self.position)
        self.position += len(frames)
        batch = frames[0] if len(frames) == 1 else b"".join(frames)
        return batch, info is None or (info.ended and self.position >= info.length)


class StreamRegistry:
    """The producers running in this process; readers counted across every instance.

    Grace and stop are decided by the instance that runs a stream's producer. Readers on any
    instance are counted in the store; when the count falls to zero, or a stop is asked for,
    the producing instance is told over the store's control bus.
    """

    def __init__(
        self,
        store: Store,
        upstream: UpstreamClient,
        policy: LogPolicy,
        idempotency: IdempotencyKeys,
        *,
        limiter: Limiter,
        usage: UsageBook,
        prices: Prices,
        metrics: Metrics,
        resume_grace: float,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.policy = policy
        self.idempotency = idempotency
        self.limiter = limiter
        self.usage = usage
        self.prices = prices
        self.metrics = metrics
        self.resume_grace = resume_grace
        self._producers: dict[str, asyncio.Task[None]] = {}
        self._owners: dict[str, str] = {}  # stream id -> user, for the streams running here
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        store.on_control(self._on_control)

    def __len__(self) -> int:
        """Streams generating in this process."""
        return len(self._producers)

    async def open(self, owner: str, payload: dict[str, Any], idempotency_key: str | None = None) -> tuple[str, bool]:
        """A stream for this request: (stream id, True) for a new one, which `start()` must run;
        (its id, False) when the same user already sent this request with this Idempotency-Key.
        """
        stream_id = new_stream_id()
        await self.store.create_stream(stream_id, owner, self.store.instance)
        earlier = None
        if idempotency_key is not None:
            request = fingerprint(payload)
            earlier = await self.idempotency.claim(owner, idempotency_key, request, stream_id)
            if earlier is not None and await self.store.stream_info(earlier) is None:
                # The earlier stream has expired: this request starts afresh under the same key.
                await self.idempotency.release(owner, idempotency_key)
                earlier = await self.idempotency.claim(owner, idempotency_key, request, stream_id)
        if earlier is not None:
            await self._discard(stream_id)
            log.info("stream %s: attached again by its Idempotency-Key", earlier)
            return earlier, False
        try:
            await self.limiter.take_stream(owner, stream_id)
        except GatewayError:
            await self._discard(stream_id)
            if idempotency_key is not None:
                await self.idempotency.release(owner, idempotency_key)  # a retry may try again
            raise
        return stream_id, True

    async def _discard(self, stream_id: str) -> None:
        """A stream created for a request that will not run: gone at once."""
        await self.store.end_stream(stream_id, StreamState.CANCELLED, [], retention=0)

    def start(self, stream_id: str, owner: str, payload: dict[str, Any]) -> None:
        """Start generating. Without a reader, the stream is cancelled once the grace is over
        (`FIRST_OPEN_WINDOW` at the least: a browser needs a moment to open the ticket URL)."""
        options = payload.get("stream_options")
        meter = UsageMeter(self.usage, self.prices, owner, str(payload.get("model")), payload.get("messages") or [],
                           client_wants_usage=isinstance(options, dict) and options.get("include_usage") is True)
        producer = produce(stream_id, self.store, self.upstream, payload, self.policy, meter, self.metrics)
        task = asyncio.get_running_loop().create_task(producer, name=f"produce-{stream_id}")
        self._producers[stream_id] = task
        self._owners[stream_id] = owner
        self.metrics.streams.inc()
        self._idle.clear()
        task.add_done_callback(lambda t: self._produced(stream_id, t))
        self._start_grace(stream_id, max(self.resume_grace, FIRST_OPEN_WINDOW))

    def _produced(self, stream_id: str, task: asyncio.Task[None]) -> None:
        self._producers.pop(stream_id, None)
        self.metrics.streams.dec()
        self._free_slot(stream_id)
        self._owners.pop(stream_id, None)
        timer = self._grace.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        if not task.cancelled() and task.exception() is not None:
            log.error("stream %s: producer crashed", stream_id, exc_info=task.exception())
        if not self._producers:
            self._idle.set()

    async def attach(self, stream_id: str, position: int = 0) -> Reader:
        """A reader of the stream from `position`, woken by its changes from now on."""
        reader = Reader(self.store, stream_id, position)
        await reader.start()
        try:
            if await self.store.add_reader(stream_id) == 1:
                await self._tell_producer(stream_id, "attach")
        except BaseException:
            reader.close()
            raise
        return reader

    async def detach(self, reader: Reader) -> None:
        """The reader's connection is gone; a running stream nobody reads gets its grace period."""
        reader.close()
        try:
            if await self.store.remove_reader(reader.stream_id) == 0:
                await self._tell_producer(reader.stream_id, "idle")
        except StoreUnavailable:
            log.warning("stream %s: could not count a reader leaving", reader.stream_id)

    async def _tell_producer(self, stream_id: str, verb: str) -> None:
        info = await self.store.stream_info(stream_id)
        if info is not None and not info.ended:
            await self.store.send_control(info.instance, verb, stream_id)

    def _on_control(self, verb: str, stream_id: str) -> None:
        """A message for the producer of `stream_id`, from this instance or another."""
        task = self._producers.get(stream_id)
        if task is None:
            return
        if verb == "attach":
            timer = self._grace.pop(stream_id, None)
            if timer is not None:
                timer.cancel()
        elif verb == "idle":
            self._free_slot(stream_id)  # the user's client is gone: the slot is theirs again
            self._start_grace(stream_id, self.resume_grace)
        elif verb == "stop":
            log.info("stream %s: stopped", stream_id)
            self.metrics.cancellations.labels("stop").inc()
            task.cancel()

    def _free_slot(self, stream_id: str) -> None:
        owner = self._owners.get(stream_id)
        if owner is not None:
            self._spawn(self.limiter.free_stream(owner, stream_id))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a small piece of bookkeeping in the background (closed at shutdown)."""
        task = asyncio.ensure_future(work)
        self._checks.add(task)
        task.add_done_callback(self._checked)

    def _checked(self, task: asyncio.Task[None]) -> None:
        self._checks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), StoreUnavailable):
            log.warning("the store is unavailable; a stream slot is freed when it expires")
        else:
            log.error("stream bookkeeping failed", exc_info=task.exception())

    def _start_grace(self, stream_id: str, seconds: float) -> None:
        timer = self._grace.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        self._grace[stream_id] = asyncio.get_running_loop().call_later(seconds, self._grace_over, stream_id)

    def _grace_over(self, stream_id: str) -> None:
        self._grace.pop(stream_id, None)
        self._spawn(self._cancel_if_unread(stream_id))

    async def _cancel_if_unread(self, stream_id: str) -> None:
        task = self._producers.get(stream_id)
        try:
            unread = task is not None and await self.store.readers(stream_id) == 0
        except StoreUnavailable:
            return  # the producer fails on its own while the store is away
        if unread and task is not None:
            log.info("stream %s: no reader left; cancelling the upstream request", stream_id)
            self.metrics.cancellations.labels("no_reader").inc()
            task.cancel()

    async def wait_started(self, stream_id: str, timeout: float) -> StreamInfo | None:
        """The stream's state once its upstream answered (or failed), or after `timeout`."""
        return await self._wait_state(stream_id, timeout, lambda info: info.state is not StreamState.PENDING)

    async def _wait_state(self, stream_id: str, timeout: float, done: Callable[[StreamInfo], bool]) -> StreamInfo | None:
        changed = asyncio.Event()
        await self.store.watch_stream(stream_id, changed.set)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed.clear()
                    info = await self.store.stream_info(stream_id)
                    if info is None or done(info):
                        return info
                    await changed.wait()
        except TimeoutError:
            return await self.store.stream_info(stream_id)
        finally:
            self.store.unwatch_stream(stream_id, changed.set)

    async def stop(self, stream_id: str) -> StreamInfo | None:
        """Cancel the stream's upstream request now, wherever it runs; its state after."""
        task = self._producers.get(stream_id)
        if task is not None:
            log.info("stream %s: stopped", stream_id)
            self.metrics.cancellations.labels("stop").inc()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return await self.store.stream_info(stream_id)
        info = await self.store.stream_info(stream_id)
        if info is None or info.ended:
            return info
        await self.store.send_control(info.instance, "stop", stream_id)
        return await self._wait_state(stream_id, STOP_TIMEOUT, lambda i: i.ended)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream generates here, for at most `timeout` seconds; True if none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop every stream still generating (at shutdown, after the drain)."""
        self.metrics.cancellations.labels("shutdown").inc(len(self._producers))
        for task in self._producers.values():
            task.cancel(SHUTDOWN)  # their readers are told to resume (producer.restarting)
        for task in self._checks:
            task.cancel()
        tasks = list(self._producers.values()) + list(self._checks)
        await asyncio.gather(*tasks, return_exceptions=True)
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()
