"""The producer: upstream chunks -> a stream's log (DESIGN.md §5 step 4).

It runs as its own task, apart from any connection, so that a slow or vanished reader never
stalls the upstream read, and it is the only writer of its stream's log: it numbers the frames.
Every way it can end is written into the log: [DONE] after the upstream's [DONE]; an error frame
and [DONE] after a failure; on cancellation (stop, no reader left, shutdown) the frames so far
and [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from .errors import GatewayError, server_error
from .frames import DONE_DATA, encode_event
from .store import Store, StoreUnavailable, StreamState
from .upstream import ChatStream, UpstreamClient

log = logging.getLogger("sse_gateway.producer")

END_RETRY_SECONDS = 30.0
END_RETRY_INTERVAL = 0.5


@dataclass(frozen=True)
class LogPolicy:
    retention: float  # seconds an ended stream stays readable
    max_events: int  # frames one stream may hold, error and [DONE] included


def too_long(max_events: int) -> GatewayError:
    return GatewayError(
        502, f"The answer exceeded the gateway's limit of {max_events} events per stream.",
        type="upstream_error", code="stream_too_long",
    )


async def produce(stream_id: str, store: Store, upstream: UpstreamClient, payload: dict[str, Any], policy: LogPolicy) -> None:
    """Relay one streaming chat request into the log of `stream_id` until it ends."""
    seq = 0

    def frame(data: bytes) -> bytes:
        nonlocal seq
        seq += 1
        return encode_event(data, id=f"{stream_id}:{seq}")

    body: ChatStream | None = None
    state, error, started = StreamState.DONE, None, False
    try:
        body = await upstream.open_chat_stream(payload)
        await store.set_running(stream_id)
        started = True
        async with contextlib.aclosing(body.batches()) as batches:
            async for batch in batches:
                room = policy.max_events - 2 - seq  # keep room for the error frame and [DONE]
                if batch[:room]:
                    await store.append(stream_id, [frame(chunk.raw) for chunk in batch[:room]])
                if len(batch) > room:
                    raise too_long(policy.max_events)
    except GatewayError as exc:
        log.info("stream %s failed: %s %s", stream_id, exc.status, exc.code)
        state, error = StreamState.FAILED, exc
    except asyncio.CancelledError:
        state = StreamState.CANCELLED
        raise
    except Exception:
        log.exception("stream %s: unexpected failure", stream_id)
        state, error = StreamState.FAILED, server_error()
    finally:
        if body is not None:
            body.close()  # a failure or a stop: the upstream request ends here too
        final = [frame(error.to_json())] if error is not None else []
        final.append(frame(DONE_DATA))
        await _record_end(store, stream_id, state, final, policy.retention, None if started else error)


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
