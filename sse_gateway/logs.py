"""Logging: plain lines, or one JSON object per line, each carrying the request, stream and user.

The request id, user and stream id live in context variables that handlers set; asyncio copies
the context into tasks they start (a stream's producer), so every line knows whose work it is.
Keys never go in: the user is the name from --api-keys, not the key.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson

__all__ = ["Throttled", "access", "configure_logging", "request_id", "stream_id", "user"]

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
user: contextvars.ContextVar[str] = contextvars.ContextVar("user", default="-")
stream_id: contextvars.ContextVar[str] = contextvars.ContextVar("stream_id", default="-")


access_log = logging.getLogger("sse_gateway.access")


class Throttled:
    """A warning about a condition that repeats (Redis away, no file descriptors left): one line
    per `every` seconds, saying how many more times it happened since the last one."""

    def __init__(self, logger: logging.Logger, every: float) -> None:
        self._log = logger
        self._every = every
        self._last = -float("inf")
        self._held = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self._every:
            self._held += 1
            return
        more = f" ({self._held} more times since the last line)" if self._held else ""
        self._log.warning(message + more, *args)
        self._last, self._held = now, 0


def access(status: int, method: str, path: str, seconds: float, request: str, user: str, stream: str) -> None:
    """The access line of one request: the path without its query string, which may carry a
    read token. The line names its request itself, as a streamed response ends in a callback
    rather than in the handler's context."""
    level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
    if access_log.isEnabledFor(level):
        access_log.log(level, "%d %s %s %.1fms request=%s user=%s", status, method, path, 1000.0 * seconds,
                       request, user, extra={"request_id": request, "user": user, "stream_id": stream})


class _Context(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # A line may name its request itself (`extra=`): the access line, written when a stream
        # ends, from whatever callback ended it.
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
            record.user = user.get()
            record.stream_id = stream_id.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
            "stream_id": getattr(record, "stream_id", "-"),
            "user": getattr(record, "user", "-"),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(user)s %(stream_id)s]: %(message)s"


def configure_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_Context())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
