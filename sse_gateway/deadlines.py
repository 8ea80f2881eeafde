"""One timer for many deadlines (DESIGN.md §6: no timer per connection).

Heartbeats of idle streams, writes stuck on a full socket, upstreams gone silent, entries of the
memory store that expire: each is a target with an `on_deadline(now)` method, and one timer
serves them all. A target says when it wants to be asked again, so a stream busy with data costs
nothing here: it comes up once an interval, finds that the stream wrote meanwhile, and goes back
with its new due time. A target has one deadline at a time: adding it again (sooner, say,
because its socket just filled up) replaces the earlier one, which is skipped when it comes up.

Deadlines are kept in buckets `resolution` seconds wide (a timing wheel, keyed by bucket
number): adding one is a list append, and a heap orders only the buckets, so that ten thousand
idle streams cost a few hundred heap entries, not ten thousand. A bucket is taken when its end
has passed: a target is asked up to `resolution` after its deadline, never before (so a
heartbeat never goes out early, and never more often than the interval needs).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable
from typing import Protocol

__all__ = ["Deadline", "Deadlines"]

log = logging.getLogger("sse_gateway.deadlines")


class Deadline(Protocol):
    deadline_at: float  # when the target is to be asked next (kept by Deadlines)

    def on_deadline(self, now: float) -> float | None:
        """Act if due; return when to be asked again (a clock reading), or None to be forgotten."""


class Deadlines:
    def __init__(self, resolution: float = 0.01, clock: Callable[[], float] = time.monotonic) -> None:
        if resolution <= 0:
            raise ValueError("the resolution of deadlines must be positive")
        self.resolution = resolution
        self.clock = clock
        self._buckets: dict[int, list[Deadline]] = {}
        self._order: list[int] = []  # heap of the buckets' numbers
        self._timer: asyncio.TimerHandle | None = None
        self._timer_bucket = math.inf

    def __len__(self) -> int:
        """Deadlines held, replaced ones not yet dropped included."""
        return sum(len(bucket) for bucket in self._buckets.values())

    def add(self, at: float, target: Deadline) -> None:
        """Ask `target` at `at` (a `clock()` reading) or up to `resolution` after, instead of
        when it was to be asked before."""
        target.deadline_at = at
        number = math.ceil(at / self.resolution)
        bucket = self._buckets.get(number)
        if bucket is not None:
            bucket.append(target)
            return
        self._buckets[number] = [target]
        heapq.heappush(self._order, number)
        if number < self._timer_bucket:
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_bucket = number = self._order[0]
        delay = max(0.0, number * self.resolution - self.clock())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer, self._timer_bucket = None, math.inf
        now = self.clock()
        order, buckets, resolution, inf = self._order, self._buckets, self.resolution, math.inf
        again: list[tuple[float, Deadline]] = []
        while order and order[0] * resolution <= now:
            number = heapq.heappop(order)
            for target in buckets.pop(number):
                due = target.deadline_at
                if due == inf or math.ceil(due / resolution) != number:
                    continue  # asked already, or added again since for another time
                target.deadline_at = inf
                try:
                    at = target.on_deadline(now)
                except Exception:  # one broken target must not stop every other one
                    log.exception("a deadline failed")
                    continue
                if at is None or target.deadline_at != inf:  # done, or added anew meanwhile
                    continue
                if at > now:
                    self.add(at, target)  # a later bucket: not one this turn takes
                else:
                    again.append((at, target))  # due again at once: waits for the next turn
        for at, target in again:
            if target.deadline_at == inf:
                self.add(at, target)
        if order and self._timer is None:
            self._arm()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_bucket = None, math.inf
        self._buckets.clear()
        self._order.clear()
