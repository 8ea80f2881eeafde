"""One timer for many deadlines: asked when due (never before), replaced, batched."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from sse_gateway.deadlines import Deadlines


class Target:
    def __init__(self, every: float | None = None) -> None:
        self.asked: list[float] = []
        self.every = every
        self.deadline_at = math.inf
        self.changed = asyncio.Event()

    def on_deadline(self, now: float) -> float | None:
        self.asked.append(now)
        self.changed.set()
        return now + self.every if self.every is not None else None


async def test_a_target_is_asked_when_due_and_never_before():
    deadlines = Deadlines(resolution=0.01)
    target = Target()
    due = time.monotonic() + 0.05
    deadlines.add(due, target)
    await asyncio.wait_for(target.changed.wait(), 2)
    assert len(target.asked) == 1 and target.asked[0] >= due
    assert len(deadlines) == 0  # forgotten: it returned None
    deadlines.close()


async def test_a_periodic_target_comes_back_every_interval():
    deadlines = Deadlines(resolution=0.005)
    target = Target(every=0.03)
    deadlines.add(time.monotonic() + 0.03, target)
    while len(target.asked) < 4:
        target.changed.clear()
        await asyncio.wait_for(target.changed.wait(), 2)
    gaps = [b - a for a, b in zip(target.asked, target.asked[1:], strict=False)]
    assert all(gap >= 0.03 for gap in gaps)  # never early: no more asks than the interval needs
    deadlines.close()


async def test_adding_again_replaces_the_earlier_deadline():
    deadlines = Deadlines(resolution=0.01)
    target = Target()
    deadlines.add(time.monotonic() + 30, target)  # a heartbeat far away...
    deadlines.add(time.monotonic() + 0.02, target)  # ...replaced by a write timeout soon
    await asyncio.wait_for(target.changed.wait(), 2)
    deadlines.add(time.monotonic() + 0.02, target)
    target.changed.clear()
    await asyncio.wait_for(target.changed.wait(), 2)
    assert len(target.asked) == 2  # the 30 s entry will be skipped: it was replaced
    deadlines.close()


async def test_deadlines_close_together_share_one_wake_up():
    deadlines = Deadlines(resolution=0.2)
    targets = [Target() for _ in range(100)]
    bucket_start = (math.floor(time.monotonic() / 0.2) + 1) * 0.2  # the next bucket's start
    for i, target in enumerate(targets):
        deadlines.add(bucket_start + 0.001 * (i + 1), target)  # 1 ms apart: all in one bucket
    await asyncio.wait_for(targets[-1].changed.wait(), 2)
    assert len({target.asked[0] for target in targets}) == 1  # all asked in the same turn
    deadlines.close()


def test_the_resolution_must_be_positive():
    with pytest.raises(ValueError):
        Deadlines(resolution=0)
