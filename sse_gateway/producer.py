"""The producer: upstream chunks -> a stream's log (DESIGN.md §5 step 4).

It runs as its own task, apart from any connection, so that a slow or vanished reader never
stalls the upstream read, and it is the only writer of its stream's log: it numbers the frames.
Every way it can end is written into the log: [DONE] after the upstream's [DONE]; an error frame
and [DONE] after a failure (or when the stream outlives --max-stream-lifetime); on cancellation
(stop, no reader left, shutdown) the frames so far and [DONE]. Whatever happened, what the
stream consumed is recorded in the usage book.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .errors import GatewayError, server_error
from .frames import DONE_DATA, encode_event
from .metrics import Metrics
from .store import Store, StoreUnavailable, StreamState
from .upstream import ChatStream, UpstreamClient, UpstreamError
from .usage import UsageMeter

log = logging.getLogger("sse_gateway.producer")

END_RETRY_SECONDS = 30.0
END_RETRY_INTERVAL = 0.5


@dataclass(frozen=True)
class LogPolicy:
    retention: float  # seconds an ended stream stays readable
    max_events: int  # frames one stream may hold, error and [DONE] included
    max_lifetime: float | None = None  # seconds a stream may generate


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


SHUTDOWN = "gateway shutting down"  # the cancel message of producers stopped at shutdown


def restarting() -> GatewayError:
    """What readers of a stream cut by a shutdown read last (before [DONE])."""
    return GatewayError(
        503, "This gateway instance shut down before the answer was complete. Resume the stream with "
        "Last-Event-ID to get everything it wrote, or ask again.", type="server_error", code="gateway_restarting",
    )


def with_usage_requested(payload: dict[str, Any]) -> dict[str, Any]:
    """The request as sent upstream: asking for the usage chunk, which the gateway records."""
    options = payload.get("stream_options")
    return {**payload, "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True}}


class _Numbering:
    """Frame ids `<stream id>:<seq>`, in the order the producer writes them."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.seq = 0

    def __call__(self, data: bytes) -> bytes:
        self.seq += 1
        return encode_event(data, id=f"{self.stream_id}:{self.seq}")


async def _relay_upstream(
    stream_id: str, store: Store, body: ChatStream, frame: _Numbering, policy: LogPolicy,
    meter: UsageMeter | None, metrics: Metrics | None,
) -> None:
    loop = asyncio.get_running_loop()
    began = last = loop.time()
    first = True
    async with contextlib.aclosing(body.batches()) as batches:
        async for batch in batches:
            now = loop.time()
            if metrics is not None:
                (metrics.time_to_first_token if first else metrics.token_gap).observe(now - (began if first else last))
            first, last = False, now
            chunks = [chunk for chunk in batch if meter is None or meter.see(chunk.obj)]
            room = policy.max_events - 2 - frame.seq  # keep room for the error frame and [DONE]
            if chunks[:room]:
                await store.append(stream_id, [frame(chunk.raw) for chunk in chunks[:room]])
            if len(chunks) > room:
                raise too_long(policy.max_events)


async def produce(
    stream_id: str,
    store: Store,
    upstream: UpstreamClient,
    payload: dict[str, Any],
    policy: LogPolicy,
    meter: UsageMeter | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Relay one streaming chat request into the log of `stream_id` until it ends."""
    frame = _Numbering(stream_id)
    body: ChatStream | None = None
    state, error, started = StreamState.DONE, None, False
    ended_early: str | None = None
    try:
        async with asyncio.timeout(policy.max_lifetime):
            body = await upstream.open_chat_stream(with_usage_requested(payload) if meter else payload)
            await store.set_running(stream_id)
            started = True
            await _relay_upstream(stream_id, store, body, frame, policy, meter, metrics)
    except TimeoutError:  # only the lifetime: upstream timeouts arrive as UpstreamErrors
        log.info("stream %s: over its lifetime of %gs", stream_id, policy.max_lifetime)
        state, error, ended_early = StreamState.FAILED, lived_too_long(policy.max_lifetime or 0), "lifetime"
        if metrics is not None:
            metrics.cancellations.labels("lifetime").inc()
    except GatewayError as exc:
        log.info("stream %s failed: %s %s", stream_id, exc.status, exc.code)
        state, error, ended_early = StreamState.FAILED, exc, "failed"
        if metrics is not None and isinstance(exc, UpstreamError):
            metrics.upstream_errors.labels(exc.code or "upstream_error").inc()
    except asyncio.CancelledError as exc:
        if exc.args == (SHUTDOWN,):
            state, error, ended_early = StreamState.FAILED, restarting(), "shutdown"
        else:
            state, ended_early = StreamState.CANCELLED, "cancelled"
        raise
    except Exception:
        log.exception("stream %s: unexpected failure", stream_id)
        state, error, ended_early = StreamState.FAILED, server_error(), "failed"
    finally:
        if body is not None:
            body.close()  # a failure or a stop: the upstream request ends here too
        final = [frame(error.to_json())] if error is not None else []
        final.append(frame(DONE_DATA))
        await _record_end(store, stream_id, state, final, policy.retention, None if started else error)
        if meter is not None and started:
            await meter.record(ended_early)


async def _record_end(store: Store, stream_id: str, state: StreamState, frames: list[bytes], retention: float,
                      start_error: GatewayError | None) -> None:
    """Write the end of the stream; while the store is away, keep trying for a while, so that
    readers who resume once it is back find an ended stream rather than one forever running."""
    deadline = asyncio.get_running_loop().time() + END_RETRY_SECONDS
    while True:
        try:
            await store.end_stream(stream_id, state, frames, retention, start_error)
            return
        except StoreUnavailable:
            if asyncio.get_running_loop().time() > deadline:
                log.error("stream %s: its end could not be recorded; the store stayed away", stream_id)
                return
            await asyncio.sleep(END_RETRY_INTERVAL)
