"""The producer: upstream chunks -> a stream's log (DESIGN.md §5 step 4).

It runs apart from any connection, so that a slow or vanished reader never stalls the upstream
read, and it is the only writer of its stream's log: it numbers the frames. A task waits for
the upstream's response head; from then on the producer is driven by the upstream connection
itself: each arrival of data is read, framed and appended in one callback, and the log hands the
frames to the readers that are caught up. No task, future or timer exists per chunk; silences of
the upstream and the stream's lifetime are watched through one shared `Deadlines` heap.

Every way a stream can end is written into the log: [DONE] after the upstream's [DONE]; an
error frame and [DONE] after a failure (or when the stream outlives --max-stream-lifetime); on a
stop (asked for, no reader left, shutdown) the frames so far and [DONE]. Whatever happened, what
the stream consumed is recorded in the usage book.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .deadlines import Deadlines
from .errors import GatewayError, server_error
from .frames import DONE_DATA, encode_event
from .metrics import Metrics
from .store import StoreUnavailable, StreamLogs, StreamState
from .upstream import ChatStream, Chunk, UpstreamClient, UpstreamError, timed_out
from .usage import UsageMeter, carries_content

log = logging.getLogger("sse_gateway.producer")

END_RETRY_SECONDS = 30.0
END_RETRY_INTERVAL = 0.5

# Why a producer is stopped before its upstream ends.
STOP, NO_READER, SHUTDOWN, LIFETIME = "stop", "no_reader", "shutdown", "lifetime"


@dataclass(frozen=True)
class LogPolicy:
    retention: float  # seconds an ended stream stays readable
    max_events: int  # frames one stream may hold, error and [DONE] included
    max_lifetime: float | None = None  # seconds a stream may generate
    idle_timeout: float = 300.0  # the longest silence of the upstream once its head has come


def too_long(max_events: int) -> GatewayError:
    return GatewayError(
        502, f"The answer exceeded the gateway's limit of {max_events} events per stream.",
        type="upstream_error", code="stream_too_long",
    )


def lived_too_long(seconds: float) -> GatewayError:
    return GatewayError(
        504, f"The answer took longer than the gateway allows ({seconds:g} s).",
        type="upstream_error", code="stream_lifetime_exceeded",
    )


def restarting() -> GatewayError:
    """What readers of a stream cut by a shutdown read last (before [DONE])."""
    return GatewayError(
        503, "This gateway instance shut down before the answer was complete. Resume the stream with "
        "Last-Event-ID to get everything it wrote, or ask again.", type="server_error", code="gateway_restarting",
    )


class Dialect(Protocol):
    """What differs between the APIs a stream relays: chat completions (anonymous `data:`
    chunks, ended by [DONE]) and the Responses API (named events, ended by a terminal event)."""

    events: bool  # chunks are whole events (`event:` and `data:` lines), not bare data

    def carries_content(self, payload: bytes, obj: dict[str, Any] | None) -> bool: ...

    async def open(self, upstream: UpstreamClient, payload: dict[str, Any]) -> ChatStream: ...

    def final(self, error: GatewayError | None, stopped: bool, body: ChatStream | None,
              next_id: Callable[[], str]) -> list[bytes]:
        """The frames that end the stream's log: after a failure (`error`), a stop, or the end."""


class ChatDialect:
    events = False

    def carries_content(self, payload: bytes, obj: dict[str, Any] | None) -> bool:
        return carries_content(payload, obj)

    async def open(self, upstream: UpstreamClient, payload: dict[str, Any]) -> ChatStream:
        return await upstream.open_chat_stream(payload)

    def final(self, error: GatewayError | None, stopped: bool, body: ChatStream | None,
              next_id: Callable[[], str]) -> list[bytes]:
        """An error frame after a failure, then [DONE] whatever happened."""
        frames = [encode_event(error.to_json(), id=next_id())] if error is not None else []
        frames.append(encode_event(DONE_DATA, id=next_id()))
        return frames


CHAT = ChatDialect()


def with_usage_requested(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as sent upstream: asking for the usage chunk, which the gateway records."""
    options = payload.get("stream_options")
    return {**payload, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}


class Producer:
    """One stream's relay from its upstream answer into its log."""

    __slots__ = (
        "stream_id", "_id", "_logs", "_upstream", "_request", "_policy", "_meter", "_metrics", "_deadlines",
        "_on_end", "_task", "_body", "_dialect", "_seq", "_first_token", "_began", "_last", "_lifetime_at", "_ending", "_loop", "started",
        "ended", "recording", "deadline_at",
    )

    def __init__(self, stream_id: str, logs: StreamLogs, upstream: UpstreamClient, payload: dict[str, Any],
                 policy: LogPolicy, meter: UsageMeter | None, metrics: Metrics, deadlines: Deadlines,
                 on_end: Callable[[Producer], None], dialect: Dialect = CHAT) -> None:
        self.stream_id = stream_id
        self._dialect = dialect
        self._id = stream_id.encode()
        self._logs = logs
        self._upstream = upstream
        self._request: dict[str, Any] | None = with_usage_requested(payload) if meter else payload
        self._policy = policy
        self._meter = meter
        self._metrics = metrics
        self._deadlines = deadlines
        self._on_end = on_end
        self._task: asyncio.Task[None] | None = None
        self._body: ChatStream | None = None
        self._seq = 0
        self._first_token = False
        self._began = self._last = 0.0
        self._lifetime_at = math.inf
        self.deadline_at = math.inf
        self._ending = False
        self._loop = asyncio.get_running_loop()
        # Resolved once the upstream's head has come (None) or the stream failed before it (the
        # error, whose status the first reader can still answer with).
        self.started: asyncio.Future[GatewayError | None] = self._loop.create_future()
        self.ended: asyncio.Future[None] = self._loop.create_future()  # everything recorded
        self.recording: asyncio.Task[None] | None = None  # the end being written

    def start(self) -> None:
        self._task = self._loop.create_task(self._open(), name=f"open-{self.stream_id}")
        if self._policy.max_lifetime is not None:
            self._lifetime_at = self._deadlines.clock() + self._policy.max_lifetime
            self._deadlines.add(self._lifetime_at, self)

    async def _open(self) -> None:
        body = None
        request, self._request = self._request, None  # not kept for the stream's life
        assert request is not None
        try:
            body = await self._dialect.open(self._upstream, request)
            await self._logs.set_running(self.stream_id, body.served_by)
        except asyncio.CancelledError:  # stopped before the head came; stop() wrote the end
            if body is not None:
                body.close()
            return
        except GatewayError as exc:
            if body is not None:
                body.close()
            log.info("stream %s failed to start: %s %s", self.stream_id, exc.status, exc.code)
            if isinstance(exc, UpstreamError):
                self._metrics.upstream_errors.labels(exc.code or "upstream_error").inc()
            self._task = None
            self._end(StreamState.FAILED, exc, "failed", start_error=exc)
            return
        except Exception:
            if body is not None:
                body.close()
            log.exception("stream %s: unexpected failure", self.stream_id)
            self._task = None
            self._end(StreamState.FAILED, server_error(), "failed", start_error=server_error())
            return
        self._task = None
        self._body = body
        self._began = self._last = self._deadlines.clock()
        self.started.set_result(None)
        body.listen(self._on_data)
        self._deadlines.add(min(body.last_data + self._policy.idle_timeout, self._lifetime_at), self)
        self._on_data()  # whatever came with the head

    def _on_data(self) -> None:
        """The upstream sent something: frame it, append it, and end the stream if it ended."""
        body = self._body
        if body is None or self._ending:
            return
        try:
            chunks = body.read()
            if chunks:
                self._append(chunks, body.last_data)
        except GatewayError as exc:
            self._fail(exc)
            return
        except Exception:
            log.exception("stream %s: unexpected failure", self.stream_id)
            self._fail(server_error())
            return
        if body.ended:
            if body.failure is None:
                self._end(StreamState.DONE, None, None)
            else:
                self._fail(body.failure)

    def _append(self, chunks: list[Chunk], now: float) -> None:
        metrics = self._metrics
        if self._first_token:
            metrics.token_gap.observe(now - self._last)
        elif any(self._dialect.carries_content(payload, obj) for payload, obj in chunks):
            self._first_token = True  # the first content: not the role chunk that comes before it
            metrics.time_to_first_token.observe(now - self._began)
        self._last = now
        meter = self._meter
        room = self._policy.max_events - 2 - self._seq  # keep room for the error frame and [DONE]
        events = self._dialect.events
        frames = []
        for payload, obj in chunks:
            if meter is not None and not meter.see(payload, obj):
                continue
            if len(frames) == room:
                raise too_long(self._policy.max_events)
            self._seq += 1
            if events:  # a whole event, `event:` and `data:` lines
                frames.append(b"id: %b:%d\n%b\n\n" % (self._id, self._seq, payload))
            elif b"\n" in payload:  # data of several lines: one data: line each
                frames.append(encode_event(payload, id=f"{self.stream_id}:{self._seq}"))
            else:
                frames.append(b"id: %b:%d\ndata: %b\n\n" % (self._id, self._seq, payload))
        if frames and not self._logs.append(self.stream_id, frames):
            body = self._body
            assert body is not None
            body.pause()  # the store is behind: stop reading until it has caught up
            self._logs.on_drained(self.stream_id, body.resume)

    def _fail(self, error: GatewayError) -> None:
        log.info("stream %s failed: %s %s", self.stream_id, error.status, error.code)
        if isinstance(error, UpstreamError):
            self._metrics.upstream_errors.labels(error.code or "upstream_error").inc()
        self._end(StreamState.FAILED, error, "failed")

    def on_deadline(self, now: float) -> float | None:
        """The stream's lifetime, and the upstream's silence once the head has come."""
        if self._ending:
            return None
        if now >= self._lifetime_at:
            log.info("stream %s: over its lifetime of %gs", self.stream_id, self._policy.max_lifetime)
            self._metrics.cancellations.labels("lifetime").inc()
            self.stop(LIFETIME)
            return None
        body = self._body
        if body is None:
            return self._lifetime_at if self._lifetime_at < math.inf else None
        silent_until = body.last_data + self._policy.idle_timeout
        if now >= silent_until:
            self._fail(timed_out())
            return None
        return min(silent_until, self._lifetime_at)

    def stop(self, reason: str) -> None:
        """End the stream now: the upstream request is cancelled; readers get the frames so far
        and [DONE] (after an error frame for a shutdown or the lifetime: they should resume)."""
        if self._ending:
            return
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if reason == SHUTDOWN:
            self._end(StreamState.FAILED, restarting(), "shutdown")
        elif reason == LIFETIME:
            self._end(StreamState.FAILED, lived_too_long(self._policy.max_lifetime or 0), "lifetime")
        else:
            self._end(StreamState.CANCELLED, None, "cancelled")

    def _end(self, state: StreamState, error: GatewayError | None, ended_early: str | None,
             start_error: GatewayError | None = None) -> None:
        if self._ending:
            return
        self._ending = True
        body, self._body = self._body, None
        started = body is not None
        if body is not None:
            body.close()  # a failure or a stop: the upstream request ends here too
        if not self.started.done():
            self.started.set_result(start_error)
        final = self._dialect.final(error, state == StreamState.CANCELLED, body, self._next_id)
        self.recording = self._loop.create_task(
            self._record_end(state, final, start_error, ended_early if started else None, started),
            name=f"end-{self.stream_id}",
        )

    def _next_id(self) -> str:
        self._seq += 1
        return f"{self.stream_id}:{self._seq}"

    async def _record_end(self, state: StreamState, frames: list[bytes], start_error: GatewayError | None,
                          ended_early: str | None, started: bool) -> None:
        """Write the end of the stream; while the store is away, keep trying for a while, so that
        readers who resume once it is back find an ended stream rather than one forever running."""
        try:
            if self._meter is not None:  # first: it needs no store, and must not wait for one
                await (self._meter.record(ended_early) if started else self._meter.nothing_used())
            deadline = self._loop.time() + END_RETRY_SECONDS
            while True:
                try:
                    await self._logs.end(self.stream_id, state, frames, self._policy.retention, start_error)
                    break
                except StoreUnavailable:
                    if self._loop.time() > deadline:
                        log.error("stream %s: its end could not be recorded; the store stayed away", self.stream_id)
                        break
                    await asyncio.sleep(END_RETRY_INTERVAL)
        except asyncio.CancelledError:  # shutdown, while the store is away
            log.error("stream %s: its end could not be recorded before the shutdown", self.stream_id)
            raise
        except Exception:
            log.exception("stream %s: its end could not be recorded", self.stream_id)
        finally:
            self.ended.set_result(None)
            self._on_end(self)
