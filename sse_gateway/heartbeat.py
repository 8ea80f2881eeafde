"""One heartbeat sweeper for every open stream (DESIGN.md §6), not one timer per connection.

The sweeper wakes every quarter interval and asks each target that has written nothing for
at least `interval - tick` to send a heartbeat; so no stream is ever silent for longer than
`interval`, and a stream that is busy with data is skipped. Targets only get a flag set and
their writer woken: the writing itself stays with the connection's own writer, so a heartbeat
can never land in the middle of a frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

log = logging.getLogger("sse_gateway.heartbeat")


class HeartbeatTarget(Protocol):
    last_write: float  # time.monotonic() of the last bytes handed to the connection

    def request_heartbeat(self) -> None: ...


class HeartbeatSweeper:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.tick = interval / 4
        self._targets: set[HeartbeatTarget] = set()
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._targets)

    def add(self, target: HeartbeatTarget) -> None:
        """Start sweeping `target`; its `last_write` says when its silence began."""
        self._targets.add(target)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="heartbeat-sweeper")

    def discard(self, target: HeartbeatTarget) -> None:
        self._targets.discard(target)

    def sweep(self, now: float) -> int:
        """Ask every target silent since `now - (interval - tick)` for a heartbeat; return how many."""
        due = now - (self.interval - self.tick)
        count = 0
        for target in self._targets:
            if target.last_write <= due:
                target.request_heartbeat()
                count += 1
        return count

    async def _run(self) -> None:
        # The task ends when nothing is left to sweep and is started again by the next add().
        try:
            while self._targets:
                await asyncio.sleep(self.tick)
                self.sweep(time.monotonic())
        except Exception:  # never let one bad target silence every stream
            log.exception("heartbeat sweeper failed; restarting on the next stream")
        finally:
            self._task = None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
