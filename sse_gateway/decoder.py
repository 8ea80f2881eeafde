"""Incremental Server-Sent Events decoder, per the WHATWG algorithm (HTML §9.2.6).

Two layers, as in httpx-sse: `LineDecoder` splits bytes into lines at CRLF, CR or LF, wherever
the reads happen to cut them (a CR at the end of one read and its LF at the start of the next
are one line end); `EventDecoder` interprets lines as fields and dispatches events.

Lines are split as bytes and decoded one whole line at a time, so a multi-byte UTF-8 character
split across reads is never cut (CR and LF bytes cannot occur inside one). Invalid UTF-8 becomes
U+FFFD as the spec's "UTF-8 decode" says, and one leading BOM is dropped. There is no line-length
limit of the 64 KiB kind that `StreamReader.readline` imposes; instead `max_size` bounds the
memory one unfinished line or event may take, and exceeding it raises `DecodeError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DecodeError", "ServerSentEvent", "LineDecoder", "EventDecoder", "SSEDecoder"]

DEFAULT_MAX_SIZE = 16 * 1024 * 1024


class DecodeError(ValueError):
    """The stream cannot be decoded within the configured bounds."""


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None  # the last event ID at dispatch time, as a browser reports it


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
