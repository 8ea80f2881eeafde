"""The control bus on Redis: short messages to the instance that produces a stream."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .. import ControlBus
from .connection import guarded
from .listener import Subscriptions

__all__ = ["RedisControl"]


class RedisControl(ControlBus):
    def __init__(self, client: object, subscriptions: Subscriptions, prefix: str, sharded: bool = False) -> None:
        self.instance = subscriptions.instance
        self._client = client
        self._subscriptions = subscriptions
        self._channel = f"{prefix}instance:{self.instance}"
        self._prefix = prefix
        self._sharded = sharded  # a cluster: sharded pub/sub, the message goes to the channel's shard only
        self._handler: Callable[[str, str], None] | None = None
        self._ready: asyncio.Future[None] | None = None
        subscriptions.route(self._channel, self._received)

    def on_control(self, handler: Callable[[str, str], None]) -> None:
        self._handler = handler

    def _received(self, _channel: str, data: bytes) -> None:
        verb, _, stream_id = data.decode().partition(" ")
        if self._handler is not None:
            self._handler(verb, stream_id)

    async def ready(self) -> None:
        """Subscribed to this instance's channel, once, before anything depends on it."""
        if self._ready is None or (self._ready.done() and self._ready.exception()):
            self._ready = asyncio.ensure_future(self._subscriptions.subscribe(self._channel))
        await asyncio.shield(self._ready)

    @guarded
    async def send(self, instance: str, verb: str, stream_id: str) -> None:
        if instance == self.instance and self._handler is not None:
            self._handler(verb, stream_id)
        else:
            publish = self._client.spublish if self._sharded else self._client.publish  # type: ignore[attr-defined]
            await publish(f"{self._prefix}instance:{instance}", f"{verb} {stream_id}")
