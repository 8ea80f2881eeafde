"""Server-Sent Events encoder: fields in, exact bytes out.

Byte layout (WHATWG HTML, "Server-sent events", §9.2.5 and §9.2.6):

- an event is its `id:`, `event:` and `data:` lines in that order, ended by a blank line;
- data is split into one `data:` line per line of text at CRLF, CR or LF, the only line ends
  the SSE parser knows. `str.splitlines` is not used: it also splits at U+2028, U+0085 and
  others, which the browser keeps inside a line, so the text would change on the way.
- `retry:` and comments are single lines with no blank line after them. A blank line ends a
  block, and a block without `data:` is dispatched by some clients as an empty event (the
  `openai` SDK then fails with JSONDecodeError; DESIGN.md §4.1), so they ride ahead of the
  next real event instead.
- CR, LF and NUL in `id` or `event` are rejected rather than written: a caller that let them
  through would allow whoever chose the value to inject fields or whole events.
"""

from __future__ import annotations

import re

__all__ = ["FrameError", "encode_event", "encode_comment", "encode_retry", "PING", "DONE_DATA"]

_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_FORBIDDEN_IN_FIELD = re.compile(r"[\r\n\0]")

PING = b": ping\n"
DONE_DATA = b"[DONE]"


class FrameError(ValueError):
    """A value that cannot be written to the stream as given."""


def _check_field(name: str, value: str) -> bytes:
    if _FORBIDDEN_IN_FIELD.search(value):
        raise FrameError(f"SSE {name} must not contain CR, LF or NUL")
    return value.encode()


def _data_lines(data: str | bytes) -> bytes:
    raw = data.encode() if isinstance(data, str) else data
    if b"\n" not in raw and b"\r" not in raw:  # the common case: one JSON line
        return b"data: " + raw + b"\n"
    # CR and LF bytes never occur inside a multi-byte UTF-8 sequence, so splitting bytes is safe.
    return b"".join(b"data: " + line + b"\n" for line in _LINE_BREAK.split(raw))


def encode_event(data: str | bytes, *, id: str | None = None, event: str | None = None) -> bytes:
    """One event, ended by its blank line. `event` None or "message" writes no `event:` line."""
    out = b""
    if id is not None:
        out += b"id: " + _check_field("id", id) + b"\n"
    if event is not None and event != "message":
        if not event:
            raise FrameError("SSE event name must not be empty")
        out += b"event: " + _check_field("event", event) + b"\n"
    return out + _data_lines(data) + b"\n"


def encode_comment(text: str = "") -> bytes:
    """Comment lines (ignored by every parser): one `: ` line per line of `text`, no blank line."""
    return b"".join(b": " + line + b"\n" for line in _LINE_BREAK.split(text.encode()))


def encode_retry(milliseconds: int) -> bytes:
    """The reconnection delay line; a single line, no blank line (see the module docstring)."""
    if isinstance(milliseconds, bool) or not isinstance(milliseconds, int) or milliseconds < 0:
        raise FrameError("SSE retry must be a non-negative integer of milliseconds")
    return b"retry: %d\n" % milliseconds
