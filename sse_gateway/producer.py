"""The producer: upstream chunks -> a stream's log (DESIGN.md §5 step 4).

It runs as its own task, apart from any connection, so that a slow or vanished reader never
stalls the upstream read. Every way it can end is written into the log: [DONE] after the
upstream's [DONE]; an error frame and [DONE] after a failure; cancellation by the registry
(stop, or no reader left) leaves the frames so far and [DONE].
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from .errors import GatewayError, server_error
from .streams import Stream
from .upstream import UpstreamClient

log = logging.getLogger("sse_gateway.producer")


async def produce(stream: Stream, upstream: UpstreamClient, payload: dict[str, Any]) -> None:
    """Relay one streaming chat request into `stream` until it ends."""
    body = None
    try:
        body = await upstream.open_chat_stream(payload)
        stream.mark_running()
        async with contextlib.aclosing(body.chunks()) as chunks:
            async for chunk in chunks:
                stream.push(chunk.raw)
        stream.finish()
    except GatewayError as error:
        log.info("stream %s failed: %s %s", stream.id, error.status, error.code)
        stream.fail(error)
    except Exception:
        log.exception("stream %s: unexpected failure", stream.id)
        stream.fail(server_error())
    finally:
        if body is not None:
            body.close()
