"""Which primary of a Redis Cluster serves a key: the slot map, read with CLUSTER SLOTS.

The data path's writes (pipeline.ClusterWrites) and the sharded pub/sub connections
(listener.ShardedListener) keep connections of their own to each primary, so they need the map
too. redis-py's cluster client has one, but refreshing it marks every connection of that client
for reconnection; while a shard is down and the map is read again and again (until a replica
takes over), that would disturb every command under way on the shards that are up. This map is
read from any node that answers, on a connection of its own, and disturbs nothing.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from typing import Any

import redis.asyncio as aioredis
from redis.crc import key_slot

from .connection import UNREACHABLE, cluster_seeds, node_url

__all__ = ["Address", "SlotMap"]

log = logging.getLogger("sse_gateway.store")

Address = tuple[str, int]


class SlotMap:
    def __init__(self, url: str) -> None:
        self._url = url
        self._known: list[Address] = list(cluster_seeds(url)[0])  # nodes to ask, seeds first
        self._starts: list[int] = []  # first slot of each range, sorted
        self._ranges: list[tuple[int, int, Address]] = []
        self._reading: asyncio.Future[None] | None = None

    async def owner(self, key: str) -> Address:
        """The primary that serves `key`'s slot (the map is read the first time)."""
        if not self._ranges:
            await self.refresh()
        address = self.owner_now(key)
        if address is None:
            raise ConnectionError(f"no primary serves the slot of {key!r}")
        return address

    def owner_now(self, key: str, slot: int = -1) -> Address | None:
        """The primary of `key`'s slot (`slot`, when known) by the map as it is (None: not read
        yet, or no primary)."""
        if slot < 0:
            slot = key_slot(key.encode())
        at = bisect.bisect_right(self._starts, slot) - 1
        if at >= 0:
            start, end, address = self._ranges[at]
            if start <= slot <= end:
                return address
        return None

    async def primaries(self) -> list[Address]:
        if not self._ranges:
            await self.refresh()
        return list(dict.fromkeys(address for _start, _end, address in self._ranges))

    async def refresh(self) -> None:
        """Read the map again, once for every caller that asks meanwhile."""
        if self._reading is None or self._reading.done():
            self._reading = asyncio.ensure_future(self._read())
        await asyncio.shield(self._reading)

    async def _read(self) -> None:
        failure: BaseException | None = None
        for host, port in list(self._known):
            client = aioredis.Redis.from_url(node_url(self._url, host, port), socket_connect_timeout=1, socket_timeout=2)
            try:
                reply = await client.execute_command("CLUSTER SLOTS")
            except UNREACHABLE as exc:
                failure = exc
                continue
            finally:
                await client.aclose()
            self._load(reply, (host, port))
            return
        raise failure or ConnectionError("no node of the cluster answers")

    def _load(self, reply: Any, asked: Address) -> None:
        ranges = []
        for start, end, primary, *_replicas in reply:
            # A node that announces no address (an empty host) is reached where it was asked.
            host = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
            ranges.append((int(start), int(end), (host or asked[0], int(primary[1]))))
            for replica in _replicas:  # ask these too next time: one of them may be the primary then
                replica_host = replica[0].decode() if isinstance(replica[0], bytes) else replica[0]
                self._remember((replica_host or asked[0], int(replica[1])))
        ranges.sort()
        self._ranges = ranges
        self._starts = [start for start, _end, _address in ranges]
        for _start, _end, address in ranges:
            self._remember(address)

    def _remember(self, address: Address) -> None:
        if address not in self._known:
            self._known.append(address)
