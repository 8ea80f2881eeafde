"""The event-stream side of handlers: the head, `retry:`, the hand-off to a delivery, a clean end.

A handler method commits the head once it can (DESIGN.md §4.1, §5 step 3), takes the connection
over from Tornado (`detach`), hands it to an `EventWriter` fed by a `Delivery`, and returns: the
response goes on without a request coroutine or handler object held for it. When the response
ends (everything delivered, a failure, the client gone) `_Ended` does what Tornado's `finish()`
would have: the access line, the request count, the reader count.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from sse_gateway import logs
from sse_gateway.delivery import Delivery
from sse_gateway.errors import GatewayError
from sse_gateway.frames import PING, encode_retry
from sse_gateway.services import Services
from sse_gateway.store import StreamInfo

from .base import ApiHandler
from .wire import EventWriter


class _Ended:
    """What a streamed response does when it ends, kept without its handler."""

    __slots__ = ("services", "delivery", "on_over", "method", "path", "started", "request_id", "user", "stream_id",
                 "counted")

    def __init__(self, handler: EventStreamMixin, delivery: Delivery, on_over: Callable[[], None] | None) -> None:
        self.services = handler.services
        self.delivery = delivery
        self.on_over = on_over
        request = handler.request
        self.method, self.path, self.started = request.method or "", request.path, request._start_time
        self.request_id, self.user, self.stream_id = handler.request_id, handler.user, handler.stream_id
        self.counted = handler.take_count()

    def __call__(self, writer: EventWriter) -> None:
        services = self.services
        services.metrics.connections -= 1
        services.open_streams.discard(writer)
        self.delivery.close()
        if self.on_over is not None:
            self.on_over()
        if self.counted:
            services.active_requests -= 1
        logs.access(200, self.method, self.path, time.time() - self.started, self.request_id, self.user, self.stream_id)


class EventStreamMixin(ApiHandler):
    """For handlers that answer with events (DESIGN.md §4.1, §5 steps 3 to 6)."""

    arrived: float  # time.monotonic() of the request's arrival: heartbeats count from it
    _gone_early = False  # the client left before the head

    def initialize(self, services: Services) -> None:
        self.arrived = time.monotonic()
        super().initialize(services)

    async def name_upstream(self, stream_id: str, info: StreamInfo | None = None) -> None:
        """`X-Upstream`: which of several upstreams answers the stream, once one has (its head
        may go out before: a fallback can still be under way then)."""
        info = info or await self.services.store.logs.info(stream_id)
        if info is not None and info.upstream:
            self.set_header("X-Upstream", info.upstream)

    async def serve_events(self, delivery: Delivery, *, stream_id: str | None = None,
                           on_over: Callable[[], None] | None = None) -> None:
        """Commit the head and let `delivery` write the rest; return at once.

        `on_over` runs when the response ends, however it ends (also when the client left
        before the head could go out).
        """
        writer = self._commit(delivery, stream_id, on_over)
        if writer is None:
            return
        try:
            await delivery.start(writer)
        except GatewayError as error:
            writer.fail(error)

    def _commit(self, delivery: Delivery, stream_id: str | None,
                on_over: Callable[[], None] | None) -> EventWriter | None:
        services = self.services
        metrics, settings = services.metrics, services.settings
        connection = self.connection
        if connection.stream.closed():
            if self._gone_early:
                metrics.disconnects.labels("client_gone").inc()
            delivery.close()
            if on_over is not None:
                on_over()
            return None
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer this response
        self.set_header("Connection", "close")  # the writer owns the connection to its end (wire.py)
        if stream_id is not None:
            self.set_header("X-Stream-Id", stream_id)
        now = time.monotonic()
        interval = settings.heartbeat_interval
        # The head waited a whole interval for the upstream: a heartbeat is due with it.
        heartbeat = now - self.arrived >= interval
        head = encode_retry(settings.retry_ms) + (PING if heartbeat else b"")
        self.write(head)
        self.flush()
        metrics.bytes += len(head)
        metrics.heartbeats += heartbeat
        chunked = connection._chunking_output  # Tornado's choice for this request's HTTP version
        ended = _Ended(self, delivery, on_over)
        stream = self.detach()
        self._let_go()
        # Tornado leaves Nagle's algorithm on while a response streams (DESIGN.md §6).
        stream.set_nodelay(True)
        writer = EventWriter(stream, chunked, metrics, services.deadlines, interval, settings.write_timeout,
                             last_write=now if heartbeat else self.arrived, on_end=ended)
        writer.delivery = delivery
        metrics.connections += 1
        services.open_streams.add(writer)
        return writer

    def _let_go(self) -> None:
        """Break the references between the handler, its request and the connection, so that
        they go as soon as the handler method returns (instead of waiting for the cyclic garbage
        collector, whose pauses would fall on every stream)."""
        self._break_cycles()  # Tornado's own, done at finish(), which a detached handler skips
        request = self.request
        request.connection = None  # type: ignore[assignment]
        request.server_connection = None

    def on_connection_close(self) -> None:
        super().on_connection_close()
        self._gone_early = True  # before the head (after it, the writer is told)

    def take_count(self) -> bool:
        """Hand this request's place in --max-connections over to the response that outlives
        the handler."""
        counted, self._counted = self._counted, False
        return counted

