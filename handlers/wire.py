"""The write side of an event-stream response once its head is out (DESIGN.md §5, §6).

After the head, the handler detaches the connection from Tornado's HTTP machinery (Tornado's
`RequestHandler.detach`, made for protocols that take a connection over) and an `EventWriter`
owns the IOStream until the response ends. This keeps an open stream cheap: no request
coroutine waits in Tornado per connection, no request or handler object is held (their
headers, body and template helpers included), and a batch of frames costs one `send()`:
Tornado's `write` + `flush` would cost two futures and a loop callback per write. The rest of a
batch the socket could not take at once goes to the IOStream, which sends it when the socket
drains; until then the writer takes nothing more (`write()` says False) and its delivery catches
up from the log afterwards, so a client that stops reading holds one batch of memory at most,
and is cut off after --write-timeout. The head said `Connection: close`: the connection ends
with the response (an EventSource reconnect, like a new question, opens a new one).

Heartbeats are the writer's too: it is a deadline target, asked once an interval, which writes
`: ping` only when the stream has been silent for the whole interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from tornado.iostream import IOStream, StreamClosedError

from sse_gateway.deadlines import Deadlines
from sse_gateway.delivery import Delivery
from sse_gateway.errors import GatewayError
from sse_gateway.frames import DONE_DATA, PING, encode_event
from sse_gateway.metrics import Metrics

if TYPE_CHECKING:
    from asyncio import Future

__all__ = ["EventWriter"]

log = logging.getLogger("sse_gateway.http")

_LAST_CHUNK = b"0\r\n\r\n"
_PING_CHUNK = b"%x\r\n%b\r\n" % (len(PING), PING)


class EventWriter:
    __slots__ = ("_stream", "_socket", "_chunked", "_metrics", "_deadlines", "_interval", "_write_timeout",
                 "_on_end", "delivery", "last_write", "stalled_since", "closed", "cut_off", "deadline_at")

    def __init__(self, stream: IOStream, chunked: bool, metrics: Metrics, deadlines: Deadlines, interval: float,
                 write_timeout: float, last_write: float, on_end: Callable[[EventWriter], None]) -> None:
        self._stream = stream
        self._socket = stream.socket
        self._chunked = chunked  # HTTP/1.1: chunks; HTTP/1.0: the bytes, then the close
        self._metrics = metrics
        self._deadlines = deadlines
        self._interval = interval
        self._write_timeout = write_timeout
        self._on_end: Callable[[EventWriter], None] | None = on_end
        self.delivery: Delivery | None = None
        self.last_write = last_write  # time.monotonic() of the last bytes sent: heartbeats count from it
        self.stalled_since: float | None = None  # bytes wait in the IOStream's buffer since then
        self.closed = False  # nothing more is written
        self.cut_off = False  # this side closed the connection (a client too slow to read)
        stream.set_close_callback(self._connection_closed)
        deadlines.add(last_write + interval, self)
        if stream._write_buffer:  # the head is not all out yet: the socket is full already
            self._stalled()
            self._queue(b"")

    def write(self, data: bytes) -> bool:
        """Send `data` now; False when the writer takes no more until its delivery is drained()."""
        if self.closed:
            return False
        self._metrics.bytes += len(data)
        return self._send(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def _send(self, out: bytes) -> bool:
        self.last_write = time.monotonic()
        if self.stalled_since is not None:  # behind what the IOStream still holds, never ahead of it
            self._queue(out)
            return False
        try:
            sent = self._socket.send(out)
        except BlockingIOError:
            sent = 0
        except OSError:  # the client is gone
            self._stream.close()
            return False
        if sent == len(out):
            return True
        self._stalled()
        self._queue(out[sent:])
        return False

    def _stalled(self) -> None:
        """The socket is full: from now on the write timeout runs."""
        self.stalled_since = self.last_write
        self._deadlines.add(self.stalled_since + self._write_timeout, self)

    def _queue(self, out: bytes) -> Future[None] | None:
        try:
            future = self._stream.write(out)
        except StreamClosedError:
            return None
        future.add_done_callback(self._drained)
        return future

    def _drained(self, future: Future[None]) -> None:
        # Only this writer writes to the stream: while stalled, everything goes to its buffer.
        if self._stream._write_buffer or future.exception() is not None:
            return  # more is queued (its own future comes), or the stream is closed
        self.stalled_since = None
        if not self.closed and self.delivery is not None:
            self.delivery.drained()

    def finish(self) -> None:
        """Everything is delivered: end the response, then the connection."""
        if self.closed:
            return
        self.closed = True
        future = self._queue(_LAST_CHUNK) if self._chunked else self._queue(b"")
        if future is None:
            self._end()
        else:
            future.add_done_callback(lambda _: self._stream.close())

    def fail(self, error: GatewayError) -> None:
        """End with an error frame and [DONE]. Neither has an id, so the client's Last-Event-ID
        still says what it really has, and its resume stays exact."""
        if not self.closed:
            self.write(encode_event(error.to_json()) + encode_event(DONE_DATA))
            self.finish()

    def close(self) -> None:
        """End now, whatever is left to send (the gateway is shutting down)."""
        self.closed = True
        self._stream.close()

    def _connection_closed(self) -> None:
        if not self.closed and not self.cut_off:
            self._metrics.disconnects.labels("client_gone").inc()
        self.closed = True
        self._end()

    def _end(self) -> None:
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(self)

    def on_deadline(self, now: float) -> float | None:
        """Heartbeat a silent stream; cut off one whose bytes have waited past --write-timeout."""
        if self._on_end is None:
            return None
        if self.stalled_since is not None:
            if now - self.stalled_since < self._write_timeout:
                return self.stalled_since + self._write_timeout
            self._cut_off()
            return None
        if self.closed:
            return None
        due = self.last_write + self._interval
        if now < due:
            return due
        # The heartbeat: ten thousand idle streams send one each an interval, so it is the
        # shortest path there is to the socket.
        sent = self._send(_PING_CHUNK if self._chunked else PING)
        if self._stream.closed():  # the client is gone
            return None
        metrics = self._metrics
        metrics.heartbeats += 1
        metrics.bytes += len(PING)
        # A full socket has put the write timeout on the deadline wheel already (_stalled).
        return self.last_write + self._interval if sent else None

    def _cut_off(self) -> None:
        log.info("client too slow: no write accepted for %gs; disconnecting", self._write_timeout)
        self._metrics.disconnects.labels("slow_reader").inc()
        self.cut_off = True
        self.closed = True
        self._stream.close()  # the close callback ends the response
