"""The writing side of every event stream: head, `retry:`, replay, live frames, heartbeats."""

from __future__ import annotations

from tornado.iostream import StreamClosedError

from sse_gateway.frames import encode_retry
from sse_gateway.streams import Reader

from .base import ApiHandler


class EventStreamMixin(ApiHandler):
    """For handlers that answer with a stream's events (DESIGN.md §4.1, §5 steps 3 to 6)."""

    _reader: Reader | None = None

    def follow(self, stream_id: str, position: int = 0) -> Reader:
        """Attach this connection to a stream at `position`; heartbeats count from now."""
        reader = self._reader = self.services.streams.attach(stream_id, position)
        self.services.sweeper.add(reader)
        return reader

    async def relay(self, reader: Reader, *, wait_for_upstream: bool) -> None:
        """Write the stream to the client until [DONE] or until the client goes away.

        With `wait_for_upstream`, the head waits for the upstream's (at most one heartbeat
        interval), so that a refusal before the stream starts is still an HTTP status.
        """
        try:
            if wait_for_upstream:
                error = await reader.wait_until_started()
                if error is not None:
                    raise error
            if reader.closed:
                return
            self.set_header("Content-Type", "text/event-stream; charset=utf-8")
            self.set_header("Cache-Control", "no-cache")
            self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer this response
            self.set_header("X-Stream-Id", reader.stream_id)
            # Tornado leaves Nagle's algorithm on while a response streams (DESIGN.md §6).
            self.connection.stream.set_nodelay(True)
            self.write(encode_retry(self.services.settings.retry_ms))
            await self.flush()
            while (batch := await reader.next_batch()) is not None:
                self.write(batch)
                await self.flush()
        except StreamClosedError:
            pass
        finally:
            self.services.sweeper.discard(reader)
            self.services.streams.detach(reader)

    def on_connection_close(self) -> None:
        if self._reader is not None:
            self._reader.close()
