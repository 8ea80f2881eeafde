"""The writing side of every event stream: head, `retry:`, frames, heartbeats, a clean end."""

from __future__ import annotations

import contextlib

from tornado.iostream import StreamClosedError

from sse_gateway.errors import GatewayError
from sse_gateway.frames import DONE_DATA, encode_event, encode_retry
from sse_gateway.streams import Follower, Reader

from .base import ApiHandler


class EventStreamMixin(ApiHandler):
    """For handlers that answer with events (DESIGN.md §4.1, §5 steps 3 to 6)."""

    _follower: Follower | None = None

    async def serve_events(self, follower: Follower, *, stream_id: str | None = None,
                           wait_for_upstream: bool = False) -> None:
        """Write what `follower` reads until it ends or the client goes away.

        With `wait_for_upstream` (a stream's first reader), the head waits for the upstream's,
        for one heartbeat interval at most, so that a refusal before the stream starts is
        still an HTTP status. Heartbeats count from the follower's creation.
        """
        self._follower = follower
        self.services.sweeper.add(follower)
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

    def _start(self, stream_id: str | None) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer this response
        if stream_id is not None:
            self.set_header("X-Stream-Id", stream_id)
        # Tornado leaves Nagle's algorithm on while a response streams (DESIGN.md §6).
        self.connection.stream.set_nodelay(True)
        self.write(encode_retry(self.services.settings.retry_ms))

    async def _relay(self, follower: Follower) -> None:
        try:
            await self.flush()
            while (batch := await follower.next_batch()) is not None:
                self.write(batch)
                await self.flush()
                await follower.delivered()
        except StreamClosedError:
            pass
        except GatewayError as error:
            # The head is out: the failure (the store gone, say) becomes an error frame. Neither
            # frame has an id, so the client's Last-Event-ID still says what it really has.
            self.write(encode_event(error.to_json()) + encode_event(DONE_DATA))
            with contextlib.suppress(StreamClosedError):
                await self.flush()

    def on_connection_close(self) -> None:
        if self._follower is not None:
            self._follower.close()
