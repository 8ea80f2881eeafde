"""The connection the data path writes to Redis with: commands sent together, replies in order.

Every frame of every stream produced here goes to Redis before its readers get it, so the cost
of a command is paid per frame. Through redis-py's client a command costs some 180 µs of CPU here
(its pool, retry and callback layers, and asyncio streams under them), through a redis-py
`Connection` some 95 µs; this connection, an asyncio protocol with hiredis (the C parser
redis-py itself uses) packing and parsing, some 20 µs per round trip, whatever it carries
(bench/README.md). Commands asked for while replies are awaited go out together in one write
(auto-pipelining: everything asked for in one turn of the event loop goes out in one write), so a
burst shares one round trip.

It speaks only what the log writes need: transactions (MULTI … EXEC: for Redis, a frame written
this way costs about half what it costs through a script call, bench/README.md), scripts
(EVALSHA, and EVAL when a Redis restarted without its script cache answers NOSCRIPT), and their
replies. A lost connection fails the
commands under way with `ConnectionError` (which the store turns into 503s); the next command
connects again. Reads, keys, counters and pub/sub stay on redis-py.

On a Redis Cluster, `ClusterWrites` holds one such connection per primary and sends each command
to the primary that owns its key's slot (slots.SlotMap); a shard that is down fails only the
commands sent to it.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, TypeVar

import hiredis
from redis.asyncio.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .connection import UNREACHABLE, node_url, outage
from .slots import Address, SlotMap

__all__ = ["ClusterWrites", "PipelinedConnection", "Writes"]

T = TypeVar("T")

CONNECT_TIMEOUT = 2.0
REPLY_TIMEOUT = 5.0  # seconds the oldest command may wait for its reply before the connection is given up


_MULTI = hiredis.pack_command(("MULTI",))
_EXEC = hiredis.pack_command(("EXEC",))
_ASKING = hiredis.pack_command(("ASKING",))


class _Queued:
    """A transaction's replies: to MULTI and to the commands it queues (OK, QUEUED, or an error
    that makes EXEC fail), kept only for their errors; then EXEC's, which settles `future`."""

    __slots__ = ("errors", "future")

    def __init__(self, future: asyncio.Future[Any] | None = None) -> None:
        self.errors: list[str] = []
        self.future = future

    def settle(self, reply: Any) -> None:
        """EXEC's reply: the commands' replies, or the first error among them."""
        future = self.future
        if future is None or future.done():
            return
        if isinstance(reply, hiredis.ReplyError):  # EXECABORT: a command refused at once (MOVED, say) says why
            future.set_exception(ResponseError(self.errors[0] if self.errors else str(reply)))
            return
        for item in reply or ():
            if isinstance(item, hiredis.ReplyError):
                future.set_exception(ResponseError(str(item)))
                return
        future.set_result(reply)


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
            if type(future) is _Queued:
                if future.future is not None:
                    future.settle(reply)
                elif isinstance(reply, hiredis.ReplyError):
                    future.errors.append(str(reply))
                continue
            if future.done():
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(ResponseError(str(reply)))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.lost(RedisConnectionError("connection to Redis lost"), self)


class Writes:
    """Where the data path's commands go: `command(key, …)` runs on the node that owns `key`;
    keys of one `slot` may go in one script."""

    _digests: ClassVar[dict[str, str]] = {}  # script text -> its SHA1, shared by all

    async def command(self, key: str, *args: Any) -> Any:
        raise NotImplementedError

    async def transaction(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run `commands` together (MULTI … EXEC) on the node that owns `key`; every key they
        touch must share its slot. Their replies; an error reply raises ResponseError."""
        raise NotImplementedError

    def send(self, key: str, commands: list[tuple[Any, ...]], slot: int = -1) -> asyncio.Future[list[Any]]:
        """`transaction`, queued now (it goes out with all else asked for in this loop turn),
        without a task of its own: what the writer uses for many transactions at once. A
        redirection (MOVED) is not followed here: retry with `transaction`."""
        raise NotImplementedError

    def slot(self, key: str) -> int:
        raise NotImplementedError

    def lane(self, slot: int) -> Any:
        """Which writer takes the keys of `slot`: one per node, so that a node that is slow
        holds up only what lives on it."""
        raise NotImplementedError

    async def script(self, script: str, keys: list[str], *args: Any) -> Any:
        """Run a script on the node of its first key: by its digest, and by its text when the
        node does not have it (a restarted Redis, a new primary)."""
        digest = self._digests.get(script)
        if digest is None:
            digest = self._digests[script] = hashlib.sha1(script.encode()).hexdigest()
        try:
            return await self.command(keys[0], "EVALSHA", digest, len(keys), *keys, *args)
        except ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self.command(keys[0], "EVAL", script, len(keys), *keys, *args)

    async def ping(self) -> None:
        """Return once Redis answers (on a cluster: any primary); raise otherwise."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class PipelinedConnection(Writes):
    """One Redis: every key on the one node, so any keys may go in one script."""

    def __init__(self, url: str) -> None:
        self._params = parse_url(url)
        self._tls = url.startswith("rediss://")
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self.pending: collections.deque[tuple[float, asyncio.Future[Any] | _Queued]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None
        self._out: list[bytes] = []  # packed commands to go out together at the end of this loop turn
        self._flush: asyncio.Handle | None = None

    async def command(self, key: str, *args: Any) -> Any:
        return await self.call(*args)

    async def transaction(self, key: str, commands: list[tuple[Any, ...]], *, asking: bool = False) -> list[Any]:
        if self._protocol is None:
            await self._connect()
        return await self.send(key, commands, asking=asking)

    def send(self, key: str, commands: list[tuple[Any, ...]], slot: int = -1, *,
             asking: bool = False) -> asyncio.Future[list[Any]]:
        protocol = self._protocol
        if protocol is None:
            return asyncio.ensure_future(self.transaction(key, commands, asking=asking))
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        queued = _Queued()
        now = time.monotonic()
        if not self.pending:
            self._arm_watchdog()
        pending = self.pending
        out = self._out
        if asking:  # a slot being migrated: ASKING holds until EXEC
            pending.append((now, queued))
            out.append(_ASKING)
        pending.append((now, queued))
        out.append(_MULTI)
        pack = hiredis.pack_command
        for command in commands:
            pending.append((now, queued))
            out.append(pack(command))
        exec_reply = _Queued(future)
        exec_reply.errors = queued.errors  # the queued commands' errors explain an EXECABORT
        pending.append((now, exec_reply))
        out.append(_EXEC)
        self._schedule(protocol)
        return future

    def slot(self, key: str) -> int:
        return 0

    def lane(self, slot: int) -> Any:
        return 0

    async def ping(self) -> None:
        await self.call("PING")

    async def call(self, *args: Any, asking: bool = False) -> Any:
        """Send one command and return its reply; error replies raise ResponseError."""
        protocol = self._protocol or await self._connect()
        future = asyncio.get_running_loop().create_future()
        if not self.pending:
            self._arm_watchdog()
        if asking:
            self.pending.append((time.monotonic(), _Queued()))
            self._out.append(_ASKING)
        self.pending.append((time.monotonic(), future))
        self._out.append(hiredis.pack_command(args))
        self._schedule(protocol)
        return await future

    def _schedule(self, protocol: _Protocol) -> None:
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_soon(self._write_out, protocol)

    def _write_out(self, protocol: _Protocol) -> None:
        """Everything asked for during the last loop turn, in one write."""
        self._flush = None
        out, self._out = self._out, []
        if protocol is self._protocol and protocol.transport is not None:
            protocol.transport.write(b"".join(out))

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
        self._out = []
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for _sent, target in pending:
            future = target.future if type(target) is _Queued else target
            if future is not None and not future.done():
                future.set_exception(error)
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abort()

    def close(self) -> None:
        self.lost(RedisConnectionError("closed"))


class ClusterWrites(Writes):
    """A Redis Cluster: one pipelined connection per primary, each command sent to the primary
    that owns its key's slot. A MOVED or ASK reply (a slot that moved: resharding, a failover)
    is followed once and the slot map read again; so is a lost connection, for the next command."""

    def __init__(self, url: str, slots: SlotMap) -> None:
        self._url = url
        self._slots = slots
        self._nodes: dict[Address, PipelinedConnection] = {}
        self._refreshing: asyncio.Task[None] | None = None

    def slot(self, key: str) -> int:
        return key_slot(key.encode())

    def lane(self, slot: int) -> Any:
        return self._slots.owner_now("", slot)  # None until the map is read: a lane of its own

    def _connection(self, address: Address) -> PipelinedConnection:
        connection = self._nodes.get(address)
        if connection is None:
            connection = self._nodes[address] = PipelinedConnection(node_url(self._url, *address))
        return connection

    async def command(self, key: str, *args: Any) -> Any:
        return await self._routed(key, lambda connection, asking: connection.call(*args, asking=asking))

    async def transaction(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any]:
        return await self._routed(key, lambda connection, asking: connection.transaction(key, commands, asking=asking))

    def send(self, key: str, commands: list[tuple[Any, ...]], slot: int = -1) -> asyncio.Future[list[Any]]:
        address = self._slots.owner_now(key, slot)
        if address is None:  # the map is not read yet
            return asyncio.ensure_future(self.transaction(key, commands))
        future = self._connection(address).send(key, commands)
        future.add_done_callback(self._after_send)
        return future

    def _after_send(self, future: asyncio.Future[Any]) -> None:
        """A shard gone or a slot moved: read the map again for the next writes."""
        exc = None if future.cancelled() else future.exception()
        if isinstance(exc, RedisConnectionError) or (isinstance(exc, ResponseError) and str(exc).startswith("MOVED ")):
            self.refresh()

    async def _routed(self, key: str, send: Callable[[PipelinedConnection, bool], Awaitable[T]]) -> T:
        """`send` on the primary of `key`'s slot; a redirection is followed once."""
        connection = self._connection(await self._slots.owner(key))
        try:
            return await send(connection, False)
        except ResponseError as exc:
            kind, _, rest = str(exc).partition(" ")
            if kind not in ("MOVED", "ASK"):
                raise
            if kind == "MOVED":
                self.refresh()
            host, _, port = rest.partition(" ")[2].rpartition(":")
            return await send(self._connection((host, int(port))), kind == "ASK")
        except RedisConnectionError:
            self.refresh()  # the primary may have failed over: learn the new one for the next command
            raise

    async def ping(self) -> None:
        """Every primary at once; the first answer will do (one that hangs does not hold it up)."""
        pings = [asyncio.ensure_future(self._connection(address).call("PING"))
                 for address in await self._slots.primaries()]
        failure: BaseException = RedisConnectionError("no primary answers")
        try:
            for answer in asyncio.as_completed(pings):
                try:
                    await answer
                    return
                except UNREACHABLE as exc:
                    failure = exc
            raise failure
        finally:
            for ping in pings:
                ping.cancel()

    def refresh(self) -> None:
        """Read the slot map again, once at a time, in the background."""
        if self._refreshing is None:
            self._refreshing = asyncio.ensure_future(self._refresh())

    async def _refresh(self) -> None:
        try:
            await self._slots.refresh()
        except UNREACHABLE as exc:  # no node answers: the next failure tries again
            outage.warn(exc, "; the cluster's slot map is not read")
        finally:
            self._refreshing = None

    def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for connection in self._nodes.values():
            connection.close()
