"""The writing side of every event stream: head, `retry:`, frames, heartbeats, a clean end."""

from __future__ import annotations

import contextlib
import time

from tornado.iostream import StreamClosedError

from sse_gateway.errors import GatewayError
from sse_gateway.frames import DONE_DATA, PING, encode_event, encode_retry
from sse_gateway.streams import Follower, Reader

from .base import ApiHandler


class EventStreamMixin(ApiHandler):
    """For handlers that answer with events (DESIGN.md §4.1, §5 steps 3 to 6)."""

    _follower: Follower | None = None
    _cut_off = False  # this side closed the connection (a slow reader)

    async def serve_events(self, follower: Follower, *, stream_id: str | None = None,
                           wait_for_upstream: bool = False) -> None:
        """Write what `follower` reads until it ends or the client goes away.

        With `wait_for_upstream` (a stream's first reader), the head waits for the upstream's,
        for one heartbeat interval at most, so that a refusal before the stream starts is
        still an HTTP status. Heartbeats count from the follower's creation.
        """
        self._follower = follower
        follower.on_write_timeout = self._write_timed_out
        self.services.sweeper.add(follower)
        self.services.metrics.connections.inc()
        try:
            if wait_for_upstream and isinstance(follower, Reader):
                error = await follower.wait_until_started()
                if error is not None:
                    raise error
            if follower.closed:
                return
            self._start(stream_id)
            await self._relay(follower)
        finally:
            self.services.sweeper.discard(follower)
            self.services.metrics.connections.dec()

    def _start(self, stream_id: str | None) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer this response
        if stream_id is not None:
            self.set_header("X-Stream-Id", stream_id)
        # Tornado leaves Nagle's algorithm on while a response streams (DESIGN.md §6).
        self.connection.stream.set_nodelay(True)

    async def _send(self, follower: Follower, data: bytes) -> None:
        """Write and flush. The sweeper watches `writing_since`: a client that does not take
        the data within --write-timeout (a paused or half-open socket) is disconnected, so that
        it holds no more than one batch of memory and no other reader waits for it. It can
        resume with Last-Event-ID."""
        self.write(data)
        follower.writing_since = time.monotonic()
        try:
            await self.flush()
        finally:
            follower.writing_since = None

    def _write_timed_out(self) -> None:
        self.services.metrics.disconnects.labels("slow_reader").inc()
        self._cut_off = True
        self.connection.stream.close()  # the pending flush ends with StreamClosedError

    async def _relay(self, follower: Follower) -> None:
        metrics = self.services.metrics
        try:
            head = encode_retry(self.services.settings.retry_ms)  # goes out with the response head
            await self._send(follower, head)
            metrics.bytes.inc(len(head))
            while (batch := await follower.next_batch()) is not None:
                await self._send(follower, batch)
                if batch is PING:
                    metrics.heartbeats.inc()
                else:
                    metrics.frames.inc(batch.count(b"\n\n"))  # every frame ends with a blank line
                metrics.bytes.inc(len(batch))
                await follower.delivered()
        except StreamClosedError:
            pass  # counted where the connection closed (on_connection_close, or _send)
        except GatewayError as error:
            # The head is out: the failure (the store gone, say) becomes an error frame. Neither
            # frame has an id, so the client's Last-Event-ID still says what it really has.
            self.write(encode_event(error.to_json()) + encode_event(DONE_DATA))
            with contextlib.suppress(StreamClosedError):
                await self.flush()

    def on_connection_close(self) -> None:
        if self._follower is not None:
            if not self._follower.closed and not self._cut_off:
                self.services.metrics.disconnects.labels("client_gone").inc()
            self._follower.close()
