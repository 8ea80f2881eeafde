"""The shared store: Redis, for several gateway instances acting as one (DESIGN.md §4.2, §4.3).

Every key is under the `sse:` prefix. The parts, each in its module:

- `logs`: stream logs (`sse:stream:<id>`, `sse:stream:<id>:log`), with the local logs of the
  streams produced here and their one writer;
- `channels`: users' push messages and cursors (`sse:user:<user>:…`), with a shared cache per
  user with connections here;
- `keys`: keys with an expiry (`sse:kv:<key>`) and the counters of limits;
- `control`: messages to one instance (`sse:instance:<id>`);
- `listener`: the one pub/sub connection, which only ever says "look again";
- `connection`: the client and its pool, and how failures become 503s;
- `pipeline`: the connection the data path writes with (auto-pipelined, hiredis), one per
  shard on a cluster.

`redis://` names one Redis; `redis+cluster://host:port[,…]` a Redis Cluster (connection.py): the
same keys, with hash tags that keep what one script touches on one slot, and sharded pub/sub.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

from .. import Store, StoreUnavailable
from .channels import RedisChannels
from .connection import connect, guarded, is_cluster
from .control import RedisControl
from .keys import RedisCounters, RedisKeys
from .lease import Lease
from .listener import Subscriptions
from .logs import RedisLogs
from .pipeline import ClusterWrites, PipelinedConnection, Writes
from .slots import SlotMap

__all__ = ["RedisStore"]

log = logging.getLogger("sse_gateway.store")

CLOSE_STEP = 5.0  # seconds each part of the store may take to close


class RedisStore(Store):
    def __init__(self, url: str, prefix: str = "sse:", lease: float = 10.0) -> None:
        self.instance = secrets.token_hex(6)
        self.client: Any = connect(url)  # the process's one pool, for other parts that keep data in Redis
        self.cluster = is_cluster(url)
        publish = "SPUBLISH" if self.cluster else "PUBLISH"
        slots = SlotMap(url) if self.cluster else None  # the data path's and pub/sub's own map of the shards
        self.subscriptions = Subscriptions(self.client, self.instance, slots, url)
        self.control = RedisControl(self.client, self.subscriptions, prefix, sharded=self.cluster)
        self.writes: Writes = ClusterWrites(url, slots) if slots is not None else PipelinedConnection(url)
        self.lease = Lease(self.client, self.instance, prefix, lease)
        self.logs = RedisLogs(self.client, self.writes, self.subscriptions, self.control, prefix, self.lease, publish)
        self.channels = RedisChannels(self.client, self.subscriptions, prefix, publish)
        self.keys = RedisKeys(self.client, prefix)
        self.counters = RedisCounters(self.client, prefix)

    @guarded
    async def ping(self) -> None:
        """Both paths work: commands (on a cluster, any shard: one that is down fails only what
        lives on it), and the pub/sub that carries wake-ups."""
        await self.writes.ping()
        if not await self.subscriptions.usable():
            raise StoreUnavailable()

    async def close(self) -> None:
        """Each part in turn, none for longer than CLOSE_STEP: a shutdown never waits on a
        Redis (or a shard) that does not answer."""
        for step in (self.logs.close, self.lease.close, self.channels.close, self.subscriptions.close):
            try:
                await asyncio.wait_for(step(), CLOSE_STEP)
            except TimeoutError:
                log.warning("redis store: %s did not finish within %gs at shutdown", step.__qualname__, CLOSE_STEP)
        self.writes.close()
        try:
            await asyncio.wait_for(self.client.aclose(), CLOSE_STEP)
        except TimeoutError:
            log.warning("redis store: the connection pool did not close within %gs at shutdown", CLOSE_STEP)
