"""The memory store and the reader over it: expiry, claims, batching."""

from __future__ import annotations

import asyncio

from sse_gateway.store import StreamState
from sse_gateway.store.memory import MemoryStore
from sse_gateway.streams import Reader


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_keys_expire_exactly():
    clock = Clock()
    store = MemoryStore(clock)
    await store.put("k", b"v", ttl=10)
    clock.now += 9.9
    assert await store.get("k") == b"v"
    clock.now += 0.2
    assert await store.get("k") is None
    assert len(store) == 0
    await store.close()


async def test_put_if_absent_keeps_the_live_value():
    clock = Clock()
    store = MemoryStore(clock)
    assert await store.put("k", b"first", ttl=10, only_if_absent=True) is None
    assert await store.put("k", b"second", ttl=10, only_if_absent=True) == b"first"
    clock.now += 11
    assert await store.put("k", b"third", ttl=10, only_if_absent=True) is None
    assert await store.get("k") == b"third"
    await store.close()


async def test_expire_gives_a_new_lifetime():
    clock = Clock()
    store = MemoryStore(clock)
    await store.put("k", b"v", ttl=1)
    await store.expire("k", 100)
    clock.now += 50
    assert await store.get("k") == b"v"
    await store.close()


async def test_janitor_releases_memory_without_lookups():
    store = MemoryStore()
    await store.put("short", b"v", ttl=0.05)
    await store.create_stream("s", "u", store.instance)
    await store.end_stream("s", StreamState.DONE, [b"x"], retention=0.1)
    await asyncio.wait_for(store.wait_empty(), timeout=2)
    assert len(store) == 0
    await store.close()


async def test_an_expired_stream_waits_for_its_last_reader():
    clock = Clock()
    store = MemoryStore(clock)
    await store.create_stream("s", "u", store.instance)
    reader = Reader(store, "s", 0)
    await reader.start()
    await store.end_stream("s", StreamState.DONE, [b"a", b"b"], retention=1)
    clock.now += 2
    assert await reader.next_batch() == b"ab"  # still readable: its reader was attached
    reader.close()
    assert await store.stream_info("s") is None
    await store.close()


async def test_ready_frames_are_taken_in_one_batch():
    # When several frames wait, the writer gets them all at once, so one flush carries them.
    store = MemoryStore()
    await store.create_stream("s", "u", store.instance)
    reader = Reader(store, "s", 0)
    await reader.start()
    await store.append("s", [b"1"])
    await store.append("s", [b"2"])
    await store.append("s", [b"3"])
    assert await reader.next_batch() == b"123"
    await store.end_stream("s", StreamState.DONE, [b"[DONE]"], retention=10)
    assert await reader.next_batch() == b"[DONE]"
    assert await reader.next_batch() is None
    await store.close()


async def test_a_sleeping_reader_wakes_for_frames_and_heartbeats():
    store = MemoryStore()
    await store.create_stream("s", "u", store.instance)
    reader = Reader(store, "s", 0)
    await reader.start()
    waiting = asyncio.ensure_future(reader.next_batch())
    await asyncio.sleep(0)  # the reader is now asleep
    await store.append("s", [b"x"])
    assert await asyncio.wait_for(waiting, 1) == b"x"
    reader.request_heartbeat()
    assert await reader.next_batch() == b": ping\n"
    await store.close()


async def test_redis_group_commit_keeps_every_stream_exact(redis_url):
    from sse_gateway.store.redis import RedisStore

    writer, reader = RedisStore(redis_url), RedisStore(redis_url)  # the reader has no mirror: Redis only
    streams = [f"s{n}" for n in range(50)]
    for stream in streams:
        await writer.create_stream(stream, "u", writer.instance)

    async def produce(stream: str) -> None:
        for seq in range(1, 201):
            await writer.append(stream, [f"{stream}:{seq}".encode()])
            if seq % 7 == 0:
                await asyncio.sleep(0)  # let the others in: appends interleave across streams
        await writer.end_stream(stream, StreamState.DONE, [f"{stream}:end".encode()], retention=60)

    await asyncio.gather(*(produce(stream) for stream in streams))
    for stream in streams:
        frames, position = [], 0
        while True:
            batch, info = await reader.read(stream, position)
            frames += batch
            position += len(batch)
            if info.ended and position >= info.length:
                break
        assert frames == [f"{stream}:{seq}".encode() for seq in range(1, 201)] + [f"{stream}:end".encode()]
    await writer.close()
    await reader.close()
