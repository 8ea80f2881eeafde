"""Incremental Server-Sent Events decoders, per the WHATWG algorithm (HTML §9.2.6).

`RawEventDecoder` is how the gateway reads every upstream answer: it keeps event data as bytes,
to be relayed untouched, and works a block (the lines of one event) at a time. `BlockSplitter`
cuts the bytes into blocks wherever the reads happen to cut the stream, making CRLF, CR and LF
line ends all LF on the way (a CR at the end of one read and an LF at the start of the next are
one line end); a block of the shape every OpenAI-compatible server sends (one `data:` line) is
taken on a fast path, any other follows the field rules to the letter.

`SSEDecoder` is what a browser's EventSource does, line by line, as text: two layers as in
httpx-sse, `LineDecoder` (bytes -> lines) and `EventDecoder` (lines -> events, with the last
event id, `retry` and comments reported the moment their line arrives). Clients use it (the test
suite, the benchmark); tests hold the two decoders to the same events for every split of input.

Invalid UTF-8 becomes U+FFFD, as the spec's "UTF-8 decode" says; one leading BOM is dropped.
There is no line-length limit of the 64 KiB kind that `StreamReader.readline` imposes; instead
`max_size` bounds the memory an unfinished event may take, and exceeding it raises `DecodeError`.
A long event arriving in many reads is kept as pieces and joined once: linear, not quadratic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BlockSplitter", "DecodeError", "EventDecoder", "LineDecoder", "RawEventDecoder", "ServerSentEvent", "SSEDecoder"]

DEFAULT_MAX_SIZE = 16 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"


class DecodeError(ValueError):
    """The stream cannot be decoded within the configured bounds."""


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None  # the last event ID at dispatch time, as a browser reports it


def _utf8(value: bytes) -> bytes:
    """`value` with invalid UTF-8 sequences replaced by U+FFFD (valid input is returned as is)."""
    if value.isascii():
        return value
    try:
        value.decode()
    except UnicodeDecodeError:
        return value.decode("utf-8", "replace").encode()
    return value


class BlockSplitter:
    """Bytes -> complete blocks (the lines of one event, LF-separated, without the blank line)."""

    __slots__ = ("_max_size", "_pieces", "_size", "_after_cr", "_ends_lf", "_start")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._max_size = max_size
        self._pieces: list[bytes] = []  # the unfinished block, LF line ends
        self._size = 0
        self._after_cr = False  # the last read ended with CR: an LF starting the next is its pair
        self._ends_lf = False  # the unfinished block ends with a line end
        self._start = True  # nothing has been split yet: a BOM may lead

    def feed(self, data: bytes) -> list[bytes]:
        if self._after_cr:
            self._after_cr = False
            if data[:1] == b"\n":
                data = data[1:]
        if b"\r" in data:
            self._after_cr = data[-1:] == b"\r"
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not data:
            return []
        if not (b"\n\n" in data or (self._ends_lf and data[:1] == b"\n")):
            self._keep(data)
            return []
        if self._pieces:
            self._pieces.append(data)
            data = b"".join(self._pieces)
            self._pieces.clear()
        if self._start:
            self._start = False
            if data.startswith(_BOM):
                data = data[3:]
        blocks = data.split(b"\n\n")
        tail = blocks.pop()
        self._size = 0
        self._ends_lf = False
        if tail:
            self._keep(tail)
        return blocks

    def _keep(self, data: bytes) -> None:
        self._pieces.append(data)
        self._size += len(data)
        self._ends_lf = data[-1:] == b"\n"
        if self._size > self._max_size:
            raise DecodeError(f"an SSE event is larger than {self._max_size} bytes")


class _Fields:
    """The field rules of the spec for one block; what persists between events (id, retry)."""

    __slots__ = ("last_event_id", "retry", "on_comment")

    def __init__(self, on_comment: Callable[[str], None] | None = None) -> None:
        self.last_event_id: bytes | None = None
        self.retry: int | None = None  # reconnection time in ms, as last set by the stream
        self.on_comment = on_comment

    def interpret(self, block: bytes) -> tuple[bytes | None, bytes] | None:
        """(event name or None for "message", data) of the event the block dispatches, if any."""
        data: list[bytes] = []
        event = b""
        for line in block.split(b"\n"):
            if not line:
                # A blank line at the start of a block (three line ends in a row): a dispatch
                # with nothing in the buffers, which only resets the event type.
                data.clear()
                event = b""
                continue
            if line[:1] == b":":
                if self.on_comment is not None:
                    self.on_comment(_utf8(line[1:].removeprefix(b" ")).decode())
                continue
            name, colon, value = line.partition(b":")
            if colon and value[:1] == b" ":
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value
            elif name == b"id":
                if b"\0" not in value:
                    self.last_event_id = value
            elif name == b"retry":
                if value.isascii() and value.isdigit():
                    self.retry = int(value)
            # Any other field name is ignored, as the spec requires.
        if not data:
            return None
        return (_utf8(event) if event and event != b"message" else None), _utf8(b"\n".join(data))


class RawEventDecoder:
    """Bytes -> (event name or None, data bytes) per event: what the gateway relays."""

    __slots__ = ("_blocks", "_fields")

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._blocks = BlockSplitter(max_size)
        self._fields = _Fields()

    def feed(self, data: bytes) -> list[tuple[bytes | None, bytes]]:
        events = []
        for block in self._blocks.feed(data):
            # The fast path: a single `data:` line, as OpenAI-compatible servers send them.
            if block[:5] == b"data:" and b"\n" not in block:
                value = block[6:] if block[5:6] == b" " else block[5:]
                events.append((None, value if value.isascii() else _utf8(value)))
                continue
            event = self._fields.interpret(block)
            if event is not None:
                events.append(event)
        return events


class LineDecoder:
    """Bytes -> complete lines (without their line end)."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self._max_size = max_size
        self._pending: list[bytes] = []  # pieces of a line whose end has not arrived
        self._pending_size = 0
        self._skip_lf = False  # the last read ended with CR: an LF starting the next is its pair

    def feed(self, data: bytes) -> list[bytes]:
        if self._skip_lf and data[:1] == b"\n":
            data = data[1:]
        self._skip_lf = False
        if not data:
            return []
        # bytes.splitlines breaks only at CR, LF and CRLF (unlike str.splitlines), in C.
        pieces = data.splitlines(keepends=True)
        tail = pieces.pop() if pieces[-1][-1:] not in (b"\n", b"\r") else None
        lines = []
        for piece in pieces:
            line = piece[:-2] if piece.endswith(b"\r\n") else piece[:-1]
            if self._pending:
                self._pending.append(line)
                line = b"".join(self._pending)
                self._pending.clear()
                self._pending_size = 0
            lines.append(line)
        if tail is not None:
            self._pending.append(tail)
            self._pending_size += len(tail)
            if self._pending_size > self._max_size:
                raise DecodeError(f"an SSE line is longer than {self._max_size} bytes")
        else:
            self._skip_lf = data.endswith(b"\r")
        return lines


class EventDecoder:
    """Lines -> events, following the field rules of the spec to the letter."""

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_SIZE,
        on_comment: Callable[[str], None] | None = None,
    ) -> None:
        self._max_size = max_size
        self._on_comment = on_comment
        self._first_line = True
        self._data: list[str] = []
        self._data_size = 0
        self._event = ""
        self.last_event_id: str | None = None
        self.retry: int | None = None  # reconnection time in ms, as last set by the stream

    def line(self, raw: bytes) -> ServerSentEvent | None:
        """Process one line; return the event it dispatches, if any."""
        text = raw.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            if text.startswith("\ufeff"):
                text = text[1:]
        if not text:
            return self._dispatch()
        if text[0] == ":":
            if self._on_comment is not None:
                self._on_comment(text[1:].removeprefix(" "))
            return None
        name, colon, value = text.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if name == "data":
            self._data_size += len(raw)
            if self._data_size > self._max_size:
                raise DecodeError(f"an SSE event is larger than {self._max_size} bytes")
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        # Any other field name is ignored, as the spec requires.
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = ServerSentEvent(data="\n".join(self._data), event=self._event or "message", id=self.last_event_id)
        self._data = []
        self._data_size = 0
        self._event = ""
        return event


class SSEDecoder:
    """Bytes -> events: the two layers together. An event cut off by the end of input is dropped."""

    def __init__(
        self,
        max_size: int = DEFAULT_MAX_SIZE,
        on_comment: Callable[[str], None] | None = None,
    ) -> None:
        self._lines = LineDecoder(max_size)
        self.events = EventDecoder(max_size, on_comment)

    def feed(self, data: bytes) -> list[ServerSentEvent]:
        out = []
        for raw in self._lines.feed(data):
            event = self.events.line(raw)
            if event is not None:
                out.append(event)
        return out
