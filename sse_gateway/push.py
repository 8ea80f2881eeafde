"""Push messages to a user, wherever the user is connected (DESIGN.md §4.3).

A service publishes `{"user", "event", "data"}` with an admin key; the message goes into the
user's channel in the store with a unique, increasing id, and every connection of that user, on
every instance, is woken to read it. A connection starts after its `Last-Event-ID`, or, without
one, after the user's cursor: the last message delivered to any of the user's connections, so
that what was published while the user was away arrives on connect (within the retention).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson

from .delivery import Delivery
from .errors import bad_request, load_json_body
from .frames import encode_event
from .store import StoreUnavailable, UserChannels, message_id_key

__all__ = ["PushPolicy", "UserFeed", "parse_message_id", "parse_publish"]

_MESSAGE_ID = re.compile(r"\d{1,20}-\d{1,20}")
_EVENT_NAME = re.compile(r"[^\r\n\0]{1,128}")
MAX_USER = 256


@dataclass(frozen=True)
class PushPolicy:
    retention: float  # seconds a message waits for its user
    keep: int  # messages kept per user at most


def parse_message_id(value: str) -> str:
    # Both parts are 64-bit unsigned integers in Redis Streams; a larger one is malformed on every store.
    if not _MESSAGE_ID.fullmatch(value) or any(int(part) >= 1 << 64 for part in value.split("-")):
        raise bad_request("Last-Event-ID is malformed; expected a message id like 1700000000000-0.",
                          param="Last-Event-ID", code="invalid_last_event_id")
    return value


def parse_publish(body: bytes) -> tuple[str, str, bytes]:
    """(user, event name, compact JSON data) from a publish request; 400 naming the bad field."""
    payload: Any = load_json_body(body)
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.", code="invalid_json")
    user = payload.get("user")
    if not isinstance(user, str) or not user or len(user) > MAX_USER:
        raise bad_request(f"'user' must be a non-empty string of at most {MAX_USER} characters.", param="user",
                          code="invalid_value")
    event = payload.get("event", "message")
    # CR, LF or NUL in an event name would let the publisher forge frames (frames.py).
    if not isinstance(event, str) or not _EVENT_NAME.fullmatch(event):
        raise bad_request("'event' must be 1 to 128 characters without CR, LF or NUL.", param="event",
                          code="invalid_value")
    if "data" not in payload:
        raise bad_request("Missing required parameter: 'data'.", param="data", code="missing_required_parameter")
    return user, event, orjson.dumps(payload["data"])


class UserFeed(Delivery):
    """One connection's view of a user's channel: messages after `after`, then live ones.

    Subscribed (`subscribe()`) before the response head goes out, so that nothing published
    after the head can be missed; delivering from `begin()`. After each batch it has handed to
    the connection, the user's cursor moves on.

    While the store is away, a new channel still opens (a browser's EventSource never retries
    after a status other than 200): it gets heartbeats, subscribes once the store is back
    (`UserChannels.when_back`), and delivers from then on. Nothing can be published meanwhile.
    """

    __slots__ = ("channels", "user", "after", "policy", "_cursor", "_watching", "_ready", "_retry", "_waiting",
                 "_opened")

    def __init__(self, channels: UserChannels, user: str, after: str | None, policy: PushPolicy) -> None:
        super().__init__()
        self.channels = channels
        self.user = user
        self.after = after
        self.policy = policy
        self._cursor = after
        self._watching = False
        self._ready = False  # subscribed, and where to start known
        self._retry: asyncio.Task[None] | None = None  # subscribing again, the store being back
        self._waiting = False  # for the store to come back
        self._opened: str | None = None  # a message id for the time it opened, when the store was away

    async def subscribe(self) -> None:
        """Subscribe, and without a Last-Event-ID start after the user's cursor; while the store
        is away, keep trying in the background."""
        try:
            if not self._watching:
                await self.channels.watch(self.user, self.wake)
                self._watching = True
                if self.done:  # the connection went while this was under way
                    self._watching = False
                    self.channels.unwatch(self.user, self.wake)
                    return
            if self.after is None:
                self.after = self._start(await self.channels.cursor(self.user))
        except StoreUnavailable:
            if self.after is None and self._opened is None:
                self._opened = f"{int(time.time() * 1000)}-0"
            if not self.done:
                self._waiting = True
                self.channels.when_back(self._try_again)
            return
        self._retry = None
        self._ready = True
        self.wake()

    def _start(self, cursor: str | None) -> str | None:
        """After the user's cursor; for a channel that opened while the store was away, no later
        than when it opened, although the user's other connections may have moved the cursor
        past what was published since (None: from the first message kept)."""
        if self._opened is None or cursor is None or message_id_key(cursor) < message_id_key(self._opened):
            return cursor
        return self._opened

    def _try_again(self) -> None:
        self._waiting = False
        self._retry = asyncio.ensure_future(self.subscribe())

    async def _fetch(self) -> tuple[bytes, bool]:
        if not self._ready:
            return b"", False  # not subscribed yet: the store is away
        messages = await self.channels.messages_after(self.user, self.after, self.policy.retention)
        if not messages:
            return b"", False
        self.after = messages[-1].id
        return b"".join(encode_event(m.data, id=m.id, event=m.event) for m in messages), False

    async def _delivered(self) -> None:
        if self.after is not None and self.after != self._cursor:
            await self.channels.advance_cursor(self.user, self.after, self.policy.retention)
            self._cursor = self.after

    def close(self) -> None:
        super().close()
        if self._waiting:
            self._waiting = False
            self.channels.forget(self._try_again)
        if self._retry is not None:  # a subscription under way may have registered the wake-up
            self._retry.cancel()
            self._retry = None
            self._watching = True
        if self._watching:
            self._watching = False
            self.channels.unwatch(self.user, self.wake)
