"""The stores and the delivery over them: expiry, claims, live push, lagging readers, batching."""

from __future__ import annotations

import asyncio

from sse_gateway.delivery import LogDelivery
from sse_gateway.errors import GatewayError
from sse_gateway.metrics import Metrics
from sse_gateway.store import StreamState
from sse_gateway.store.memory import MemoryStore


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """A connection as a delivery sees it: takes bytes, or says it is full."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.full = False
        self.finished = asyncio.Event()
        self.error: GatewayError | None = None

    def write(self, data: bytes) -> bool:
        self.writes.append(data)
        return not self.full

    def finish(self) -> None:
        self.finished.set()

    def fail(self, error: GatewayError) -> None:
        self.error = error
        self.finished.set()

    @property
    def received(self) -> bytes:
        return b"".join(self.writes)


async def test_keys_expire_exactly():
    clock = Clock()
    store = MemoryStore(clock)
    await store.keys.put("k", b"v", ttl=10)
    clock.now += 9.9
    assert await store.keys.get("k") == b"v"
    clock.now += 0.2
    assert await store.keys.get("k") is None
    assert len(store) == 0
    await store.close()


async def test_put_if_absent_keeps_the_live_value():
    clock = Clock()
    store = MemoryStore(clock)
    assert await store.keys.put("k", b"first", ttl=10, only_if_absent=True) is None
    assert await store.keys.put("k", b"second", ttl=10, only_if_absent=True) == b"first"
    clock.now += 11
    assert await store.keys.put("k", b"third", ttl=10, only_if_absent=True) is None
    assert await store.keys.get("k") == b"third"
    await store.close()


async def test_expire_gives_a_new_lifetime():
    clock = Clock()
    store = MemoryStore(clock)
    await store.keys.put("k", b"v", ttl=1)
    await store.keys.expire("k", 100)
    clock.now += 50
    assert await store.keys.get("k") == b"v"
    await store.close()


async def test_expiry_releases_memory_without_lookups():
    store = MemoryStore()
    await store.keys.put("short", b"v", ttl=0.05)
    await store.logs.create("s", "u")
    await store.logs.end("s", StreamState.DONE, [b"x"], retention=0.1)
    await asyncio.wait_for(store.wait_empty(), timeout=2)
    assert len(store) == 0
    await store.close()


async def test_a_reader_of_an_expired_stream_reads_its_log_to_the_end():
    clock = Clock()
    store = MemoryStore(clock)
    await store.logs.create("s", "u")
    sink = Sink()
    delivery = LogDelivery(store.logs, "s", 0, Metrics())
    await delivery.start(sink)
    await store.logs.end("s", StreamState.DONE, [b"a", b"b"], retention=1)
    clock.now += 2
    assert await store.logs.info("s") is None  # gone for new readers
    await asyncio.wait_for(sink.finished.wait(), 1)
    assert sink.received == b"ab"  # its reader had it all


async def test_frames_waiting_go_out_in_one_write():
    # When several frames wait, the reader gets them at once, so one send carries them.
    store = MemoryStore()
    await store.logs.create("s", "u")
    for frame in (b"1", b"2", b"3"):
        store.logs.append("s", [frame])
    sink = Sink()
    await LogDelivery(store.logs, "s", 0, Metrics()).start(sink)
    assert sink.writes == [b"123"]
    await store.close()


async def test_a_caught_up_reader_gets_each_frame_pushed_at_once():
    store = MemoryStore()
    await store.logs.create("s", "u")
    sink = Sink()
    await LogDelivery(store.logs, "s", 0, Metrics()).start(sink)
    store.logs.append("s", [b"x"])
    assert sink.writes == [b"x"]  # written within the append: no task, no wake-up in between
    store.logs.append("s", [b"y", b"z"])
    assert sink.writes == [b"x", b"yz"]
    await store.logs.end("s", StreamState.DONE, [b"[DONE]"], retention=10)
    assert sink.finished.is_set() and sink.received == b"xyz[DONE]"
    await store.close()


async def test_a_full_reader_catches_up_from_the_log_without_gap_or_repeat():
    store = MemoryStore()
    await store.logs.create("s", "u")
    sink = Sink()
    delivery = LogDelivery(store.logs, "s", 0, Metrics())
    await delivery.start(sink)
    sink.full = True
    store.logs.append("s", [b"1"])  # taken, but the socket is full now: no more pushes
    store.logs.append("s", [b"2"])
    store.logs.append("s", [b"3"])
    assert sink.writes == [b"1"]
    sink.full = False
    delivery.drained()
    await asyncio.sleep(0)  # the catch-up runs
    assert sink.writes == [b"1", b"23"]
    store.logs.append("s", [b"4"])  # and it follows live again
    assert sink.received == b"1234"
    await store.close()


async def test_a_reader_from_a_position_replays_then_follows():
    store = MemoryStore()
    await store.logs.create("s", "u")
    store.logs.append("s", [b"a", b"b", b"c"])
    sink = Sink()
    await LogDelivery(store.logs, "s", 2, Metrics()).start(sink)
    store.logs.append("s", [b"d"])
    assert sink.writes == [b"c", b"d"]
    await store.close()


async def test_redis_group_commit_keeps_every_stream_exact(redis_url):
    from sse_gateway.store.redis import RedisStore

    writer, reader = RedisStore(redis_url), RedisStore(redis_url)  # the reader has no local logs: Redis only
    streams = [f"s{n}" for n in range(50)]
    for stream in streams:
        await writer.logs.create(stream, "u")

    async def produce(stream: str) -> None:
        for seq in range(1, 201):
            writer.logs.append(stream, [f"{stream}:{seq}".encode()])
            if seq % 7 == 0:
                await asyncio.sleep(0)  # let the others in: appends interleave across streams
        await writer.logs.end(stream, StreamState.DONE, [f"{stream}:end".encode()], retention=60)

    await asyncio.gather(*(produce(stream) for stream in streams))
    for stream in streams:
        frames, position = [], 0
        while True:
            batch, info = await reader.logs.read(stream, position)
            frames += batch
            position += len(batch)
            if info.ended and position >= info.length:
                break
        assert frames == [f"{stream}:{seq}".encode() for seq in range(1, 201)] + [f"{stream}:end".encode()]
    await writer.close()
    await reader.close()


async def test_redis_local_readers_get_frames_once_redis_has_them(redis_url):
    from sse_gateway.store.redis import RedisStore

    store = RedisStore(redis_url)
    await store.logs.create("s", "u")
    sink = Sink()
    await LogDelivery(store.logs, "s", 0, Metrics()).start(sink)
    store.logs.append("s", [b"a"])
    assert sink.writes == []  # not before Redis has it: a resume elsewhere must find it
    other = RedisStore(redis_url)
    while not sink.writes:
        await asyncio.sleep(0.001)
    frames, _info = await other.logs.read("s", 0)
    assert frames == [b"a"] and sink.writes == [b"a"]
    await store.close()
    await other.close()


async def producing_one_frame(redis_url: str):
    """A Redis store producing stream "s", whose first frame Redis has."""
    from sse_gateway.store.redis import RedisStore

    store = RedisStore(redis_url)
    await store.logs.create("s", "u")
    store.logs.append("s", [b"a"])
    while store.logs.local("s").frames != [b"a"]:
        await asyncio.sleep(0.001)
    return store


async def test_redis_an_end_whose_caller_is_cancelled_writes_its_frames_once(redis_url):
    # end() writes the frames still queued with the last ones, shielded from a cancelled caller
    # (a stop). Its frames went back in the queue on the caller's cancellation although the
    # write went on and put them in Redis: the writer then wrote them twice.
    from sse_gateway.store.redis import RedisStore

    store = await producing_one_frame(redis_url)
    produced = store.logs._produced["s"]  # frames a failed round left queued, say
    produced.queued = [b"b", b"c"]
    ending = asyncio.ensure_future(store.logs.end("s", StreamState.DONE, [b"end"], retention=60))
    await asyncio.sleep(0)  # the write is under way
    ending.cancel()

    async def ended() -> None:
        while not store.logs.local("s").ended:
            await asyncio.sleep(0.001)

    await asyncio.wait_for(ended(), timeout=10)  # it completes all the same, here as in Redis
    assert produced.queued == []
    other = RedisStore(redis_url)
    frames, info = await other.logs.read("s", 0)
    assert frames == [b"a", b"b", b"c", b"end"] and info.ended
    await store.close()
    await other.close()


async def test_redis_an_end_after_a_write_that_timed_out_but_was_applied_writes_each_frame_once(redis_url):
    # A shard that hangs past the reply timeout may still apply the write once it wakes: its
    # frames stay queued here and come again with the end, which must not write them twice.
    from sse_gateway.store.redis import RedisStore

    store = await producing_one_frame(redis_url)
    other = RedisStore(redis_url)
    await other.logs._writes.transaction("sse:{stream:s}:log", [("XADD", "sse:{stream:s}:log", "2-0", "f", b"b")])
    produced = store.logs._produced["s"]
    produced.queued, produced.broken = [b"b", b"c"], True  # "b" is in Redis; this instance cannot know
    await store.logs.end("s", StreamState.DONE, [b"end"], retention=60)
    frames, info = await other.logs.read("s", 0)
    assert frames == [b"a", b"b", b"c", b"end"] and info.ended
    assert store.logs.local("s").frames == (b"a", b"b", b"c", b"end")
    await store.close()
    await other.close()


async def test_finished_logs_stay_within_the_retained_bytes_the_oldest_dropped_first():
    store = MemoryStore(retained_bytes=1000)
    frame = b"x" * 400
    for name in ("first", "second", "third"):
        await store.logs.create(name, "alice")
        store.logs.append(name, [frame])
        await store.logs.end(name, StreamState.DONE, [], retention=600)
    assert await store.logs.info("first") is None  # dropped long before its retention
    assert (await store.logs.info("second")).length == 1 and (await store.logs.info("third")).length == 1
    assert store.logs.retained_bytes == 800
    big = b"y" * 5000  # over the cap alone: kept, as its readers may be on it; the rest go
    await store.logs.create("big", "alice")
    store.logs.append("big", [big])
    await store.logs.end("big", StreamState.DONE, [], retention=600)
    assert [await store.logs.info(name) is None for name in ("second", "third", "big")] == [True, True, False]
    assert store.logs.retained_bytes == 5000
    await store.close()
