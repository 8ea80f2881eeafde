"""Each instance's lease in Redis: proof that it is alive (issue: an instance that dies frees
what it held).

An instance that produces streams holds `sse:lease:<instance>`, which expires `lease` seconds
after its last refresh; it refreshes it every third of that. Once the key has expired, the
instance is taken for dead, and any other instance may end its streams (logs.end_lost). Each
refresh also lists the instance in `sse:instances`, where the others look for dead ones (and
from where they drop an instance once nothing of it is left).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from .connection import UNREACHABLE, ms, outage

__all__ = ["Lease"]

log = logging.getLogger("sse_gateway.store")


class Lease:
    def __init__(self, client: Any, instance: str, prefix: str, seconds: float) -> None:
        self._client = client
        self.key = f"{prefix}lease:{instance}"
        self.prefix = f"{prefix}lease:"
        self._instance = instance
        self._instances = f"{prefix}instances"
        self.seconds = seconds
        self._task: asyncio.Task[None] | None = None
        self._taken: asyncio.Future[Any] | None = None  # the first SET, which every creator awaits
        self._fresh = True  # the last renewal reached Redis

    async def hold(self) -> None:
        """Take the lease now (before the first stream this instance produces), and keep it."""
        if self._taken is None:
            self._taken = asyncio.ensure_future(self._renew())
        taken = self._taken
        try:
            await asyncio.shield(taken)
        except BaseException:
            if self._taken is taken:
                self._taken = None  # the next stream tries again
            raise
        if not self._fresh:  # the last renewal failed (Redis was away): renew before a new stream
            await self._renew()
            self._fresh = True
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.seconds / 3)
            try:
                await self._renew()
                self._fresh = True
            except UNREACHABLE as exc:
                self._fresh = False
                outage.warn(exc, "; the instance lease is not refreshed")

    async def _renew(self) -> None:
        async with self._client.pipeline(transaction=False) as pipe:  # the two keys may be on two shards
            pipe.set(self.key, b"1", px=ms(self.seconds))
            pipe.sadd(self._instances, self._instance)
            await pipe.execute()

    async def close(self) -> None:
        """Give the lease up: this instance's streams have ended (or are being ended)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = self._taken = None
            with contextlib.suppress(*UNREACHABLE):
                await self._client.delete(self.key)
