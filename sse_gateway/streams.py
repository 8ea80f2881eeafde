"""Streams that outlive their connections (DESIGN.md §4.2, §5).

A stream's frames go into its log; any connection reads the log from a position (replay), then
follows it live (`delivery.LogDelivery`). Two services share the work:

- `Producers` runs the producers of this process and applies the rules of §4.2 to them: stopping
  is explicit; when the last reader of a running stream leaves, the stream keeps generating for
  `resume_grace` seconds so that a reconnect can resume it, then its upstream request is
  cancelled; a stream nobody ever opens is cancelled `resume_grace` seconds after its creation
  (`FIRST_OPEN_WINDOW` at the least: the browser needs a moment to open the ticket URL). It
  takes its orders from the control bus, so readers on any instance count.
- `Streams` is what handlers use: open a stream for a request (idempotency, the user's stream
  slot), start it, count its readers, wait for its start, stop it wherever it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
from collections.abc import Callable, Coroutine
from typing import Any

from .access import IdempotencyKeys, fingerprint
from .deadlines import Deadlines
from .errors import GatewayError, bad_request
from .limits import Limiter
from .metrics import Metrics
from .producer import CHAT, NO_READER, SHUTDOWN, STOP, Dialect, LogPolicy, Producer
from .store import ControlBus, StoreUnavailable, StreamInfo, StreamLogs, StreamState
from .upstream import UpstreamClient
from .usage import Prices, Settles, UsageBook, UsageMeter, UsageRow, estimate_tokens, text_of, today

__all__ = ["Producers", "Streams", "new_stream_id", "parse_last_event_id"]

log = logging.getLogger("sse_gateway.streams")

# The least time a new stream waits for its first reader (POST /v1/streams, then the GET).
FIRST_OPEN_WINDOW = 5.0
STOP_TIMEOUT = 5.0  # seconds a stop waits for another instance's producer to end the stream
END_WAIT = 2.0  # seconds a shutdown waits for the ends of streams to be recorded
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


async def _first_of(future: asyncio.Future[Any], timeout: float) -> None:
    """Until `future` is done or `timeout` seconds have passed; `future` itself is left alone."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = loop.call_later(timeout, wake)
    try:
        await waiter
    finally:
        timer.cancel()
        future.remove_done_callback(wake)


class Producers:
    """The producers running in this process, and their grace periods."""

    def __init__(self, logs: StreamLogs, control: ControlBus, upstream: UpstreamClient, policy: LogPolicy,
                 metrics: Metrics, deadlines: Deadlines, resume_grace: float) -> None:
        self.logs = logs
        self.control = control
        self.upstream = upstream
        self.policy = policy
        self.metrics = metrics
        self.deadlines = deadlines
        self.resume_grace = resume_grace
        self._running: dict[str, Producer] = {}
        self._on_end: dict[str, Callable[[], None]] = {}
        self._grace: dict[str, asyncio.TimerHandle] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        control.on_control(self._on_control)

    def __len__(self) -> int:
        """Streams generating in this process."""
        return len(self._running)

    def get(self, stream_id: str) -> Producer | None:
        return self._running.get(stream_id)

    def start(self, stream_id: str, payload: dict[str, Any], meter: UsageMeter | None,
              on_idle: Callable[[], None], *, read: bool, dialect: Dialect = CHAT) -> Producer:
        """Start generating. `on_idle` runs when the stream's readers are all gone, and when it
        ends. A stream not `read` yet is cancelled once the grace is over, unless a reader comes."""
        producer = Producer(stream_id, self.logs, self.upstream, payload, self.policy, meter, self.metrics,
                            self.deadlines, self._ended, dialect)
        self._running[stream_id] = producer
        self._on_end[stream_id] = on_idle
        self.metrics.streams += 1
        self._idle.clear()
        producer.start()
        if not read:
            self._start_grace(stream_id, max(self.resume_grace, FIRST_OPEN_WINDOW))
        return producer

    def _ended(self, producer: Producer) -> None:
        stream_id = producer.stream_id
        if self._running.get(stream_id) is not producer:
            return
        del self._running[stream_id]
        self.metrics.streams -= 1
        on_idle = self._on_end.pop(stream_id, None)
        if on_idle is not None:
            on_idle()
        timer = self._grace.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        if not self._running:
            self._idle.set()

    def stop(self, stream_id: str, reason: str = STOP) -> Producer | None:
        producer = self._running.get(stream_id)
        if producer is not None:
            log.info("stream %s: stopped (%s)", stream_id, reason)
            self.metrics.cancellations.labels(reason).inc()
            producer.stop(reason)
        return producer

    def _on_control(self, verb: str, stream_id: str) -> None:
        """A message for the producer of `stream_id`, from this instance or another."""
        if stream_id not in self._running:
            return
        if verb == "attach":
            timer = self._grace.pop(stream_id, None)
            if timer is not None:
                timer.cancel()
        elif verb == "idle":
            on_idle = self._on_end.get(stream_id)
            if on_idle is not None:
                on_idle()  # the user's client is gone: the stream slot is theirs again
            self._start_grace(stream_id, self.resume_grace)
        elif verb == "stop":
            self.stop(stream_id)

    def _start_grace(self, stream_id: str, seconds: float) -> None:
        timer = self._grace.pop(stream_id, None)
        if timer is not None:
            timer.cancel()
        self._grace[stream_id] = asyncio.get_running_loop().call_later(seconds, self._grace_over, stream_id)

    def _grace_over(self, stream_id: str) -> None:
        self._grace.pop(stream_id, None)
        self.spawn(self._cancel_if_unread(stream_id))

    async def _cancel_if_unread(self, stream_id: str) -> None:
        try:
            unread = stream_id in self._running and await self.logs.readers(stream_id) == 0
        except StoreUnavailable:
            return  # the producer fails on its own while the store is away
        if unread:
            log.info("stream %s: no reader left; cancelling the upstream request", stream_id)
            self.stop(stream_id, NO_READER)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a small piece of bookkeeping in the background (closed at shutdown)."""
        task = asyncio.ensure_future(work)
        self._checks.add(task)
        task.add_done_callback(self._checked)

    def _checked(self, task: asyncio.Task[None]) -> None:
        self._checks.discard(task)
        if task.cancelled() or task.exception() is None:
            return
        if isinstance(task.exception(), StoreUnavailable):
            log.warning("the store is unavailable; a stream's bookkeeping waits for its expiry")
        else:
            log.error("stream bookkeeping failed", exc_info=task.exception())

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no stream generates here, for at most `timeout` seconds; True if none is left."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Stop every stream still generating (at shutdown, after the drain)."""
        producers = list(self._running.values())
        for producer in producers:
            self.stop(producer.stream_id, SHUTDOWN)  # their readers are told to resume (producer.restarting)
        ends = [producer.ended for producer in producers]
        if ends:
            await asyncio.wait(ends, timeout=END_WAIT)
        for producer in producers:  # the store is away: stop retrying
            if producer.recording is not None and not producer.recording.done():
                producer.recording.cancel()
        await asyncio.gather(*ends, return_exceptions=True)
        for task in list(self._checks):
            task.cancel()
        await asyncio.gather(*self._checks, return_exceptions=True)
        for timer in self._grace.values():
            timer.cancel()
        self._grace.clear()


class Streams:
    """Streams for requests: open, start, readers, start-up, stop (DESIGN.md §4.2)."""

    def __init__(self, logs: StreamLogs, control: ControlBus, producers: Producers, idempotency: IdempotencyKeys,
                 limiter: Limiter, usage: UsageBook, prices: Prices, lease: float = 10.0) -> None:
        self.logs = logs
        self.control = control
        self.producers = producers
        self.idempotency = idempotency
        self.limiter = limiter
        self.usage = usage
        self.prices = prices
        self.lease = lease  # seconds after which an instance that stopped renewing its lease is dead
        self._watching: asyncio.Task[None] | None = None

    def _watch_producers(self) -> None:
        """Look for streams whose producer died (started with the first stream or reader here)."""
        if self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(self._find_lost())

    async def _find_lost(self) -> None:
        """Every half lease: end the streams of instances that have died, so that their readers
        get an end instead of heartbeats for ever, and what they held is freed."""
        while True:
            await asyncio.sleep(self.lease / 2)
            try:
                for stream_id, instance in await self.logs.orphans():
                    await self._end_if_lost(stream_id, instance)
            except StoreUnavailable:
                pass  # the next round, once the store is back

    async def _end_if_lost(self, stream_id: str, instance: str) -> StreamInfo | None:
        info = await self.logs.end_lost(stream_id, instance, self.producers.policy.retention)
        if info is None:
            return None
        log.warning("stream %s: the instance producing it (%s) is gone; the stream ends there", stream_id,
                    info.instance)
        self.producers.metrics.cancellations.labels("producer_lost").inc()
        # What it consumed, as an estimate: its prompt, and about a token per frame it produced.
        completion = max(0, info.length - 1)
        await self.usage.add(info.owner, UsageRow(
            today(), info.model, "producer_lost", 1, info.prompt_tokens, completion,
            self.prices.cost_nanos(info.model, info.prompt_tokens, completion)))
        await self.limiter.free_stream(info.owner, stream_id)
        return info

    def __len__(self) -> int:
        """Streams generating in this process."""
        return len(self.producers)

    async def wait_idle(self, timeout: float) -> bool:
        return await self.producers.wait_idle(timeout)

    async def open(self, owner: str, payload: dict[str, Any], idempotency_key: str | None = None, *,
                   reader: bool = False) -> tuple[str, bool]:
        """A stream for this request: (stream id, True) for a new one, which `start()` must run;
        (its id, False) when the same user already sent this request with this Idempotency-Key.
        With `reader`, the request reads the stream it gets, and is counted as its reader.
        """
        stream_id = new_stream_id()
        self._watch_producers()
        await self.logs.create(stream_id, owner, readers=1 if reader else 0, model=str(payload.get("model")),
                               prompt_tokens=estimate_tokens(text_of(payload.get("messages") or [])))
        earlier = None
        if idempotency_key is not None:
            request = fingerprint(payload)
            earlier = await self.idempotency.claim(owner, idempotency_key, request, stream_id)
            if earlier is not None and await self.logs.info(earlier) is None:
                # The earlier stream has expired: this request starts afresh under the same key.
                await self.idempotency.release(owner, idempotency_key)
                earlier = await self.idempotency.claim(owner, idempotency_key, request, stream_id)
        if earlier is not None:
            await self._discard(stream_id)
            log.info("stream %s: attached again by its Idempotency-Key", earlier)
            if reader:
                await self.add_reader(earlier)
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
        await self.logs.end(stream_id, StreamState.CANCELLED, [], retention=0)

    def start(self, stream_id: str, owner: str, payload: dict[str, Any], *, read: bool = False,
              reservation: Settles | None = None, meter: UsageMeter | None = None, dialect: Dialect = CHAT) -> None:
        """Start generating; `read`: a reader is counted already (it came with the request).
        The stream settles `reservation` (the request's tokens of the day) when it ends; `meter`
        (a chat request's by default) records what it used."""
        if meter is None:
            options = payload.get("stream_options")
            meter = UsageMeter(self.usage, self.prices, owner, str(payload.get("model")), payload.get("messages") or [],
                               client_wants_usage=isinstance(options, dict) and options.get("include_usage") is True,
                               reservation=reservation)
        freed = False

        def free_slot() -> None:  # once: when the readers leave, or when the stream ends
            nonlocal freed
            if not freed:
                freed = True
                self.producers.spawn(self.limiter.free_stream(owner, stream_id))

        self.producers.start(stream_id, payload, meter, free_slot, read=read, dialect=dialect)

    async def add_reader(self, stream_id: str) -> None:
        """Count a reader (on any instance); the stream's producer learns its first one."""
        self._watch_producers()
        if await self.logs.add_reader(stream_id) == 1:
            await self._tell_producer(stream_id, "attach")

    async def remove_reader(self, stream_id: str) -> None:
        """The reader's connection is gone; a running stream nobody reads gets its grace period."""
        try:
            if await self.logs.remove_reader(stream_id) == 0:
                await self._tell_producer(stream_id, "idle")
        except StoreUnavailable:
            log.warning("stream %s: could not count a reader leaving", stream_id)

    def reader_left(self, stream_id: str) -> None:
        """`remove_reader`, from a callback: in the background."""
        self.producers.spawn(self.remove_reader(stream_id))

    async def _tell_producer(self, stream_id: str, verb: str) -> None:
        if self.producers.get(stream_id) is not None:
            await self.control.send(self.logs.instance, verb, stream_id)
            return
        info = await self.logs.info(stream_id)
        if info is not None and not info.ended:
            await self.control.send(info.instance, verb, stream_id)

    async def started(self, stream_id: str, timeout: float) -> GatewayError | None:
        """Wait for the stream's upstream head, a failure before it, or `timeout` seconds.

        Returns the error when the stream failed before it started (its status can still be
        the reader's); None when the response head should be committed now.
        """
        producer = self.producers.get(stream_id)
        if producer is not None:
            started = producer.started
            if not started.done():
                await _first_of(started, timeout)
            return started.result() if started.done() else None
        info = await self._wait_state(stream_id, timeout, lambda i: i.state is not StreamState.PENDING)
        return info.start_error if info is not None else None

    async def wait_started(self, stream_id: str, timeout: float) -> StreamInfo | None:
        """The stream's state once its upstream answered (or failed), or after `timeout`."""
        error = await self.started(stream_id, timeout)
        info = await self.logs.info(stream_id)
        if error is not None and info is not None and info.start_error is None:
            info = dataclasses.replace(info, start_error=error)  # its end is being recorded
        return info

    async def _wait_state(self, stream_id: str, timeout: float, done: Callable[[StreamInfo], bool]) -> StreamInfo | None:
        changed = asyncio.Event()
        await self.logs.watch(stream_id, changed.set)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    changed.clear()
                    info = await self.logs.info(stream_id)
                    if info is None or done(info):
                        return info
                    await changed.wait()
        except TimeoutError:
            return await self.logs.info(stream_id)
        finally:
            self.logs.unwatch(stream_id, changed.set)

    async def stop(self, stream_id: str) -> StreamInfo | None:
        """Cancel the stream's upstream request now, wherever it runs; its state after."""
        producer = self.producers.stop(stream_id)
        if producer is not None:
            await asyncio.shield(producer.ended)
            return await self.logs.info(stream_id)
        info = await self.logs.info(stream_id)
        if info is None or info.ended:
            return info
        lost = await self._end_if_lost(stream_id, info.instance)  # its producer is gone: nobody to tell
        if lost is not None:
            return lost
        await self.control.send(info.instance, "stop", stream_id)
        return await self._wait_state(stream_id, STOP_TIMEOUT, lambda i: i.ended)

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
        await self.producers.close()
