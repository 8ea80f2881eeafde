"""Run the gateway under tracemalloc (bench/profile.sh memory): SIGUSR1 takes a baseline
snapshot, SIGUSR2 another, and writes the difference by allocation site to $TRACED_OUT."""

from __future__ import annotations

import gc
import os
import runpy
import signal
import sys
import tracemalloc

tracemalloc.start(1)
snapshots: dict[str, tracemalloc.Snapshot] = {}


def take(name: str) -> None:
    gc.collect()
    snapshots[name] = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    if name != "held":
        return
    stats = snapshots["held"].compare_to(snapshots["base"], "lineno")
    with open(os.environ.get("TRACED_OUT", "allocations.txt"), "w") as out:
        out.write(f"total {sum(s.size_diff for s in stats)} bytes in {sum(s.count_diff for s in stats)} blocks\n")
        for stat in stats[:80]:
            frame = stat.traceback[0]
            out.write(f"{stat.size_diff:>10} {stat.count_diff:>7}  {frame.filename}:{frame.lineno}\n")


signal.signal(signal.SIGUSR1, lambda *_: take("base"))
signal.signal(signal.SIGUSR2, lambda *_: take("held"))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
