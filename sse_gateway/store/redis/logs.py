"""Stream logs on Redis, written once and read by every instance (DESIGN.md §4.2).

    sse:{stream:<id>}          hash: owner, instance, state, start_error, readers
    sse:{stream:<id>}:log      Redis Stream; entry `<seq>-0` holds frame number seq in field `f`,
                               so "the frames after position k" is `XRANGE (k-0 +`
    sse:{stream:<id>}          also the pub/sub channel that says the stream changed (sharded
                               pub/sub on a cluster: the channel lives on the stream's shard)
    sse:streams-of:<instance>  the ids of the streams an instance produces, for the sweep of a
                               dead instance's streams; `sse:instances` the instances that have one

The hash tag `{stream:<id>}` puts a stream's keys and channel on one slot of a Redis Cluster, so
each script below touches one slot (the sets of an instance are written beside, not in them).

The streams this instance produces are also held here as `LocalLog`s: their local readers (most
readers) never read from Redis, and get each frame pushed to them once Redis has it, so that a
frame a client has is one any instance can resume after. One writer per process commits what
every stream here has appended since its last write, in one round trip: one transaction for any
number of streams and frames on one Redis, one per stream (per slot) on a cluster, pipelined to
each shard. Under load the cost of a round trip is shared by all the frames written in it, so
the cost per frame falls as the load rises. A producer is
asked to pause its upstream when it is MAX_QUEUED frames ahead of Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from ...errors import GatewayError
from .. import READ_BATCH, StoreUnavailable, StreamInfo, StreamLogs, StreamState, Wake
from ..local import LocalLog
from .connection import UNREACHABLE, error_from_json, error_to_json, guarded, ms, outage
from .control import RedisControl
from .lease import Lease
from .listener import Subscriptions
from .pipeline import Writes

__all__ = ["RedisLogs"]

log = logging.getLogger("sse_gateway.store")

MAX_QUEUED = 1000  # frames a producer may get ahead of Redis before it is asked to pause
LOCAL_LINGER = 10.0  # seconds a local log outlives its stream's end, for its last readers
STREAM_MAX_AGE = 86_400  # seconds a stream's keys live before it ends (a crashed producer's too)

# KEYS: meta. ARGV: owner, instance, readers already counted, lifetime until the end, model, the
# prompt's estimated tokens.
_CREATE = """
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'instance', ARGV[2], 'state', 'pending', 'readers', ARGV[3],
           'model', ARGV[5], 'prompt_tokens', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: meta, log. ARGV: the retention in ms, this instance, the producer, the publish command.
# Ends the stream as lost when its producer is the one named and it is still pending or running
# (1); 2: it ended already (it may leave the producer's set); 0: another producer's.
_END_LOST = """
local f = redis.call('HMGET', KEYS[1], 'state', 'instance')
if f[2] and f[2] ~= ARGV[3] then return 0 end
if f[1] ~= 'pending' and f[1] ~= 'running' then return 2 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'lost', '1')
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call(ARGV[4], KEYS[1], ARGV[2])
return 1
"""

# KEYS: meta. ARGV: this instance, the publish command.
_RUNNING = """
redis.call('HSET', KEYS[1], 'state', 'running', 'upstream', ARGV[3])
redis.call(ARGV[2], KEYS[1], ARGV[1])
return 1
"""

# KEYS: meta, log. ARGV: this instance, the publish command, the final state, the start error, the
# retention in ms, the number of the frame before the last ones, the last frames. Frames the log
# has already are skipped: a write that timed out (a shard that hung) may have been applied after
# all, and its frames come again here; a frame's number says which it is.
_END = """
local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local have = 0
if top[1] then have = tonumber(string.match(top[1][1], '^(%d+)-')) end
local seq = tonumber(ARGV[6])
for i = 7, #ARGV do
  seq = seq + 1
  if seq > have then redis.call('XADD', KEYS[2], seq .. '-0', 'f', ARGV[i]) end
end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'start_error', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call(ARGV[2], KEYS[1], ARGV[1])
return 1
"""

_ADD_READERS = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local n = redis.call('HINCRBY', KEYS[1], 'readers', ARGV[1])
if n < 0 then redis.call('HSET', KEYS[1], 'readers', 0) n = 0 end
return n
"""


class _Produced:
    """A stream produced here: its local log, and its frames on their way to Redis."""

    __slots__ = ("log", "key", "slot", "lane", "queued", "writing", "broken", "on_drained")

    def __init__(self, log: LocalLog, key: str, slot: int, lane: Any) -> None:
        self.log = log  # holds what Redis has
        self.key = key  # of its log in Redis
        self.slot = slot  # of its keys: streams of one slot go in one transaction
        self.lane = lane  # its writer's: the shard its keys were on when it began
        self.queued: list[bytes] = []  # appended, not yet written
        self.writing = False  # frames of it are in the writer's round trip now
        self.broken = False  # a write failed: Redis is away
        self.on_drained: list[Wake] = []


class RedisLogs(StreamLogs):
    def __init__(self, client: Any, writes: Writes, subscriptions: Subscriptions,
                 control: RedisControl, prefix: str, lease: Lease, publish: str = "PUBLISH") -> None:
        self.instance = subscriptions.instance
        self._lease = lease
        self._client = client  # redis-py: reads of streams produced elsewhere
        self._writes = writes  # the data path's connection: every write of a stream here
        self._subscriptions = subscriptions
        self._control = control
        self._prefix = prefix
        self._publish = publish  # PUBLISH, or SPUBLISH on a cluster (the channel's shard only)
        self._produced: dict[str, _Produced] = {}
        # Streams with frames queued, by lane: one writer per lane, one round trip at a time each.
        # One Redis is one lane; on a cluster each primary is one, so that a shard that is slow
        # or hangs holds up only the streams that live on it.
        self._dirty: dict[Any, dict[str, _Produced]] = {}
        self._writers: dict[Any, asyncio.Task[None]] = {}
        self._written = asyncio.Event()  # set after each round trip of any writer

    @property
    def _instances(self) -> str:
        return f"{self._prefix}instances"  # the instances that produce streams (or did, and died)

    def _meta(self, stream_id: str) -> str:
        return f"{self._prefix}{{stream:{stream_id}}}"

    def _log(self, stream_id: str) -> str:
        return f"{self._prefix}{{stream:{stream_id}}}:log"

    async def _eval(self, script: str, keys: list[str], *args: Any) -> Any:
        return await self._writes.script(script, keys, *args)

    @guarded
    async def create(self, stream_id: str, owner: str, readers: int = 0, model: str = "",
                     prompt_tokens: int = 0) -> None:
        await self._control.ready()  # a stop sent to this instance must find it listening
        await self._lease.hold()  # alive, for every instance that reads what it produces
        # Listed first, then created (one round trip: both are sent before either reply): a stream
        # that exists is always found by the sweep of its producer's streams, should it die.
        await asyncio.gather(
            self._writes.command(self._streams_of(self.instance), "SADD", self._streams_of(self.instance), stream_id),
            self._eval(_CREATE, [self._meta(stream_id)], owner, self.instance, readers, STREAM_MAX_AGE, model,
                       prompt_tokens),
        )
        key = self._log(stream_id)
        slot = self._writes.slot(key)
        self._produced[stream_id] = _Produced(LocalLog(owner, self.instance), key, slot, self._writes.lane(slot))

    def _info(self, stream_id: str, fields: dict[bytes, bytes], length: int) -> StreamInfo | None:
        if b"owner" not in fields:
            return None
        return StreamInfo(
            stream_id, fields[b"owner"].decode(), StreamState(fields[b"state"].decode()), length,
            fields.get(b"instance", b"").decode(), error_from_json(fields.get(b"start_error")),
            lost=fields.get(b"lost") == b"1", model=fields.get(b"model", b"").decode(),
            prompt_tokens=int(fields.get(b"prompt_tokens") or 0), upstream=fields.get(b"upstream", b"").decode(),
        )

    def _here(self, stream_id: str) -> LocalLog | None:
        """The local log of a stream produced here; StoreUnavailable while Redis lost its writes."""
        produced = self._produced.get(stream_id)
        if produced is None:
            return None
        if produced.broken:
            raise StoreUnavailable()
        return produced.log

    @guarded
    async def info(self, stream_id: str) -> StreamInfo | None:
        local = self._here(stream_id)
        if local is not None:
            return local.info(stream_id)
        # Without MULTI: end() writes its frames and state at once, and a reader compares its
        # position with the length read after the state, so no order of events misleads it.
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self._meta(stream_id))
            pipe.xlen(self._log(stream_id))
            fields, length = await pipe.execute()
        return self._info(stream_id, fields, length)

    @guarded
    async def read(self, stream_id: str, after: int) -> tuple[list[bytes], StreamInfo | None]:
        local = self._here(stream_id)
        if local is not None:
            return list(local.frames[after : after + READ_BATCH]), local.info(stream_id)
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.xrange(self._log(stream_id), min=f"({after}-0" if after else "-", max="+", count=READ_BATCH)
            pipe.hgetall(self._meta(stream_id))
            pipe.xlen(self._log(stream_id))
            entries, fields, length = await pipe.execute()
        return [entry[b"f"] for _, entry in entries], self._info(stream_id, fields, length)

    def local(self, stream_id: str) -> LocalLog | None:
        produced = self._produced.get(stream_id)
        return produced.log if produced is not None else None

    # --- writes of the streams produced here --------------------------------------------------

    def append(self, stream_id: str, frames: list[bytes]) -> bool:
        produced = self._produced[stream_id]
        if produced.broken:
            raise StoreUnavailable()
        produced.queued += frames
        lane = produced.lane
        dirty = self._dirty.get(lane)
        if dirty is None:
            dirty = self._dirty[lane] = {}
        dirty[stream_id] = produced
        if lane not in self._writers:
            self._writers[lane] = asyncio.get_running_loop().create_task(self._write(lane))
        return len(produced.queued) < MAX_QUEUED

    def on_drained(self, stream_id: str, resume: Wake) -> None:
        self._produced[stream_id].on_drained.append(resume)

    async def _write(self, lane: Any) -> None:
        """A lane's writer: everything queued in it, one round trip at a time."""
        try:
            while batch := self._dirty.pop(lane, None):
                groups: dict[int, list[_Produced]] = {}  # by slot: one transaction each (one in all, on one Redis)
                for produced in batch.values():
                    if produced.queued and not produced.broken:
                        groups.setdefault(produced.slot, []).append(produced)
                        produced.writing = True
                work = [(group, [(p, p.queued) for p in group]) for group in groups.values()]
                for group in groups.values():
                    for produced in group:
                        produced.queued = []
                # Every transaction queued at once, without a task each: one write per shard.
                sent = [self._writes.send(group[0].key, self._commands(frames), group[0].slot) for group, frames in work]
                try:
                    results = await asyncio.gather(*sent, return_exceptions=True)
                    for (group, frames), result in zip(work, results, strict=True):
                        if isinstance(result, ResponseError) and str(result).startswith(("MOVED ", "ASK ")):
                            try:  # a slot moved: once more, where Redis said
                                await self._writes.transaction(group[0].key, self._commands(frames))
                                result = None
                            except Exception as exc:  # noqa: BLE001 (reported with the rest below)
                                result = exc
                        self._settle(frames, result if isinstance(result, BaseException) else None)
                except BaseException as exc:  # cancelled while waiting: nothing is known to be written
                    for group, frames in work:
                        if group[0].writing:
                            self._settle(frames, exc)
                    raise
                finally:
                    self._round_done()
        finally:
            del self._writers[lane]

    def _commands(self, frames: list[tuple[_Produced, list[bytes]]]) -> list[tuple[Any, ...]]:
        """One slot's part of a round: each stream's new frames, and a word on its channel."""
        commands: list[tuple[Any, ...]] = []
        for produced, new in frames:
            key, before = produced.key, len(produced.log.frames)
            commands += [("XADD", key, f"{seq}-0", "f", frame) for seq, frame in enumerate(new, before + 1)]
            if before == 0:
                commands.append(("EXPIRE", key, STREAM_MAX_AGE))
            commands.append((self._publish, key[:-4], self.instance))  # the stream's channel: its meta key
        return commands

    def _settle(self, frames: list[tuple[_Produced, list[bytes]]], failure: BaseException | None) -> None:
        """After a transaction: its frames to the local readers, or, on failure, back in the
        queue, their streams broken (StoreUnavailable) until a write of theirs succeeds."""
        if failure is not None:
            if isinstance(failure, UNREACHABLE):
                outage.warn(failure, f"; frames of {len(frames)} stream(s) not written")
            elif not isinstance(failure, asyncio.CancelledError):
                log.error("frames of %d stream(s) not written: %s", len(frames), failure)
            for produced, new in frames:
                produced.queued[:0] = new  # kept in order: a Redis position is the frame's number
                produced.broken = True
                produced.writing = False
                produced.log.fail(StoreUnavailable())  # readers must not wait for what cannot come
            return
        for produced, new in frames:
            produced.log.extend(new)  # in Redis now: to the readers here
        for produced, _new in frames:
            produced.writing = False
            if produced.on_drained and len(produced.queued) < MAX_QUEUED:
                resumes, produced.on_drained = produced.on_drained, []
                for resume in resumes:
                    resume()

    def _round_done(self) -> None:
        self._written.set()
        self._written = asyncio.Event()

    async def _settled(self, produced: _Produced) -> None:
        """Until the writer has no round trip of this stream's frames under way."""
        while produced.writing:
            await self._written.wait()

    async def _commit(self, stream_id: str, write: Callable[[_Produced], Awaitable[None]]) -> None:
        """A write of a stream produced here (its state, its end) and its effect on the local
        log, after its queued frames; run to the end even when the producer is cancelled
        meanwhile (a stop), so that Redis and the local log never disagree."""
        produced = self._produced[stream_id]

        async def run() -> None:
            await self._settled(produced)
            try:
                await write(produced)
            except UNREACHABLE:
                produced.broken = True
                self._subscriptions.wake(self._meta(stream_id))
                raise
            produced.broken = False

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # read, should nobody await it
        await asyncio.shield(task)

    @guarded
    async def set_running(self, stream_id: str, upstream: str = "") -> None:
        async def write(produced: _Produced) -> None:
            await self._eval(_RUNNING, [self._meta(stream_id)], self.instance, self._publish, upstream)
            produced.log.state = StreamState.RUNNING
            produced.log.upstream = upstream
            self._subscriptions.wake(self._meta(stream_id))

        await self._commit(stream_id, write)

    @guarded
    async def end(self, stream_id: str, state: StreamState, frames: list[bytes], retention: float,
                  start_error: GatewayError | None = None) -> None:
        meta = self._meta(stream_id)

        async def write(produced: _Produced) -> None:
            # The frames still queued (a failed write left them, or the writer has not come to
            # them yet) go in this call, ahead of the last ones: the writer skips them.
            last = [*produced.queued, *frames]
            produced.queued = []
            try:
                await self._eval(_END, [meta, self._log(stream_id)], self.instance, self._publish, state.value,
                                 error_to_json(start_error), ms(retention), len(produced.log.frames), *last)
            except BaseException:
                produced.queued[:0] = last[: len(last) - len(frames)]  # for the next try
                raise
            # Here, not in the caller: a caller cancelled meanwhile (a stop) leaves this to
            # complete, and the local log must then end as the one in Redis has.
            produced.log.failure = None
            produced.log.finish(state, last, start_error)
            asyncio.get_running_loop().call_later(min(retention, LOCAL_LINGER), self._produced.pop, stream_id, None)
            self._subscriptions.wake(meta)
            self._subscriptions.spawn(self._unlist(self.instance, stream_id))

        await self._commit(stream_id, write)

    async def _unlist(self, instance: str, stream_id: str) -> None:
        """An ended stream leaves its producer's list; if Redis is away, the sweep of a dead
        producer's streams removes it later."""
        with contextlib.suppress(*UNREACHABLE):
            await self._writes.command(self._streams_of(instance), "SREM", self._streams_of(instance), stream_id)

    # --- readers ------------------------------------------------------------------------------

    @guarded
    async def watch(self, stream_id: str, wake: Wake) -> None:
        await self._subscriptions.watch(self._meta(stream_id), wake, local_only=stream_id in self._produced)

    def unwatch(self, stream_id: str, wake: Wake) -> None:
        self._subscriptions.unwatch(self._meta(stream_id), wake)

    def _streams_of(self, instance: str) -> str:
        return f"{self._prefix}streams-of:{instance}"

    @guarded
    async def orphans(self) -> list[tuple[str, str]]:
        instances = [i.decode() for i in await self._client.smembers(self._instances)]
        others = [i for i in instances if i != self.instance]
        if not others:
            return []
        found: list[tuple[str, str]] = []
        async with self._client.pipeline(transaction=False) as pipe:
            for instance in others:
                pipe.exists(self._lease.prefix + instance)
            leases = await pipe.execute()
        for instance, held in zip(others, leases, strict=True):
            if held:
                continue
            members = await self._client.smembers(self._streams_of(instance))
            if not members:  # nothing of it left: forget the instance
                await self._client.srem(self._instances, instance)
                continue
            found += [(member.decode(), instance) for member in members]
        return found

    @guarded
    async def end_lost(self, stream_id: str, instance: str, retention: float) -> StreamInfo | None:
        if stream_id in self._produced:
            return None  # produced here: alive
        # The lease, then the stream: on a cluster they live on different shards, so the check
        # cannot be in the script; a lease that lapsed has made its instance dead for good.
        if await self._client.exists(self._lease.prefix + instance):
            return None
        ended = await self._eval(_END_LOST, [self._meta(stream_id), self._log(stream_id)], ms(retention),
                                 self.instance, instance, self._publish)
        if ended:
            await self._unlist(instance, stream_id)
        if ended != 1:
            return None
        self._subscriptions.wake(self._meta(stream_id))  # readers here: the message is our own
        return await self.info(stream_id)

    @guarded
    async def add_reader(self, stream_id: str) -> int:
        return int(await self._eval(_ADD_READERS, [self._meta(stream_id)], 1))

    @guarded
    async def remove_reader(self, stream_id: str) -> int:
        return int(await self._eval(_ADD_READERS, [self._meta(stream_id)], -1))

    @guarded
    async def readers(self, stream_id: str) -> int:
        value = await self._client.hget(self._meta(stream_id), "readers")
        return int(value) if value is not None else 0

    async def close(self) -> None:
        if self._writers:
            await asyncio.wait(list(self._writers.values()), timeout=2)
        writers = list(self._writers.values())
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)
