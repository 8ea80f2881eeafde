"""The connection the data path writes to Redis with: commands sent together, replies in order.

Every frame of every stream produced here goes to Redis before its readers get it, so the cost
of a command is paid per frame. Through redis-py's client a command costs some 180 µs of CPU here
(its pool, retry and callback layers, and asyncio streams under them), through a redis-py
`Connection` some 95 µs; this connection, an asyncio protocol with hiredis (the C parser
redis-py itself uses) packing and parsing, some 20 µs per round trip, whatever it carries
(bench/README.md). Commands asked for while replies are awaited go out together in one write
(auto-pipelining), so a burst shares one round trip.

It speaks only what the log writes need: scripts (EVAL, so that a Redis restarted without its
script cache needs nothing reloaded) and their replies. A lost connection fails the commands
under way with `ConnectionError` (which the store turns into 503s); the next command connects
again. Reads, keys, counters and pub/sub stay on redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["PipelinedConnection"]

CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 5.0  # seconds the oldest command may wait for its reply before the connection is given up


class _Protocol(asyncio.Protocol):
    def __init__(self, owner: PipelinedConnection) -> None:
        self.owner = owner
        self.reader = hiredis.Reader(notEnoughData=False)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        pending = self.owner.pending
        while (reply := reader.gets()) is not False:
            if not pending:  # a reply nobody asked for: the connection is out of step
                self.owner.lost(RedisConnectionError("unexpected reply from Redis"), self)
                return
            future = pending.popleft()[1]
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost(RedisConnectionError("connection to Redis lost"), self)


class PipelinedConnection:
    def __init__(self, url: str) -> None:
        self._params = parse_url(url)
        self._tls = url.startswith("rediss://")
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self.pending: collections.deque[tuple[float, asyncio.Future[Any]]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None

    async def call(self, *args: Any) -> Any:
        """Send one command and return its reply; error replies raise ResponseError."""
        protocol = self._protocol or await self._connect()
        future = asyncio.get_running_loop().create_future()
        if not self.pending:
            self._arm_watchdog()
        self.pending.append((time.monotonic(), future))
        assert protocol.transport is not None
        protocol.transport.write(hiredis.pack_command(args))
        return await future

    async def _connect(self) -> _Protocol:
        """Connect, once for every caller that finds no connection meanwhile."""
        connecting = self._connecting
        if connecting is None:
            connecting = self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        params = self._params
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if "path" in params:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), params["path"])
                else:
                    context = ssl.create_default_context() if self._tls else None
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self), params.get("host", "localhost"), params.get("port", 6379), ssl=context,
                    )
        except (OSError, TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc.__class__.__name__}") from None
        self._protocol = protocol
        try:
            if params.get("password"):
                auth = (params["username"], params["password"]) if params.get("username") else (params["password"],)
                await self.call("AUTH", *auth)
            if params.get("db"):
                await self.call("SELECT", params["db"])
        except BaseException:
            self.lost(RedisConnectionError("cannot set up the connection to Redis"))
            raise
        return protocol

    def _arm_watchdog(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(REPLY_TIMEOUT, self._check)

    def _check(self) -> None:
        """A reply is overdue: Redis hangs (or the network does); give the connection up."""
        self._watchdog = None
        if not self.pending:
            return
        waited = time.monotonic() - self.pending[0][0]
        if waited >= REPLY_TIMEOUT:
            self.lost(RedisTimeoutError("Redis did not answer in time"))
        else:
            self._watchdog = asyncio.get_running_loop().call_later(REPLY_TIMEOUT - waited, self._check)

    def lost(self, error: Exception, protocol: _Protocol | None = None) -> None:
        """The connection is gone: fail what waits on it; the next call connects again."""
        if protocol is not None and protocol is not self._protocol:
            return  # an older connection's end, after a new one was made
        protocol, self._protocol = self._protocol, None
        pending, self.pending = self.pending, collections.deque()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for _sent, future in pending:
            if not future.done():
                future.set_exception(error)
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def close(self) -> None:
        self.lost(RedisConnectionError("closed"))
