"""One sweeper for every open stream (DESIGN.md §6), not timers per connection.

It wakes every quarter of the shorter of the heartbeat interval and the write timeout, and
looks at each connection once:
- one that has written nothing for `interval - tick` is asked for a heartbeat, so that no
  stream is ever silent for longer than `interval` (a stream busy with data is skipped). The
  writing itself stays with the connection's writer: a heartbeat never lands inside a frame.
- one whose write has been waiting for `write_timeout` (a client that stopped reading, a
  half-open socket) is told so, and disconnects; no timer is set per write for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

log = logging.getLogger("sse_gateway.heartbeat")


class HeartbeatTarget(Protocol):
    last_write: float  # time.monotonic() of the last bytes handed to the connection
    writing_since: float | None  # time.monotonic() a write began that has not completed

    def request_heartbeat(self) -> None: ...

    def write_timed_out(self) -> None: ...


class HeartbeatSweeper:
    def __init__(self, interval: float, write_timeout: float = float("inf")) -> None:
        self.interval = interval
        self.write_timeout = write_timeout
        self.tick = min(interval, write_timeout) / 4
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
        """Heartbeats for the silent, and an end for stuck writes; return how many were asked."""
        due = now - (self.interval - self.tick)
        stuck = now - self.write_timeout
        count = 0
        for target in list(self._targets):  # a stuck one may leave the set while we look
            since = target.writing_since
            if since is not None and since <= stuck:
                target.write_timed_out()
            elif target.last_write <= due:
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
