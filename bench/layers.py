"""Fold py-spy's raw stacks (`py-spy record --native --format raw`) into the layers of the data
path, the leaf-most frame that belongs to a layer deciding. Only the event loop's thread counts
(helper threads, such as the SQLite usage book's, mostly sleep on a lock), and its idle time
(the wait in epoll) is left out.

    .venv/bin/python bench/layers.py stacks.txt
"""

from __future__ import annotations

import collections
import re
import sys

LAYERS = [  # (layer, pattern on a frame), the first match from the leaf wins
    ("cyclic GC", re.compile(r"gc_collect|collect_with_callback|deduce_unreachable|visit_decref|move_unreachable")),
    ("kernel: send", re.compile(r"^(__)?send(to|msg)? \(libc|^write \(libc|^__write \(libc")),
    ("kernel: recv", re.compile(r"^(__)?recv(from|msg)? \(libc|^read \(libc|^__read \(libc")),
    ("kernel: getpid", re.compile(r"^getpid \(libc")),
    ("kernel: other", re.compile(r"\(libc\.so")),
    ("metrics", re.compile(r"prometheus_client|sse_gateway/metrics\.py")),
    ("logging", re.compile(r"logging/|sse_gateway/logs\.py")),
    ("SSE decoding", re.compile(r"sse_gateway/decoder\.py")),
    ("JSON, usage", re.compile(r"orjson|sse_gateway/usage\.py|_needs_reading|_parse \(sse_gateway")),
    ("store", re.compile(r"sse_gateway/store/")),
    ("delivery, wake-ups", re.compile(r"sse_gateway/(delivery|streams|deadlines)\.py")),
    ("producer, framing", re.compile(r"sse_gateway/(producer|frames|upstream)\.py")),
    ("handlers, socket writes", re.compile(r"handlers/")),
    ("Tornado", re.compile(r"tornado/")),
    ("aiohttp read path", re.compile(r"aiohttp/|yarl|multidict")),
    ("event loop", re.compile(r"asyncio/|_asyncio|uvloop|selectors|Runner\.run")),
    ("other Python", re.compile(r"\.py:")),
]


def main(path: str) -> None:
    layers: collections.Counter[str] = collections.Counter()
    total = 0
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        if frames[-1].startswith(("epoll_pwait", "epoll_wait")) or not any("sse_server.py" in f for f in frames):
            continue  # idle, or not the event loop's thread
        total += int(count)
        layer = next((name for frame in reversed(frames) for name, pattern in LAYERS if pattern.search(frame)), "?")
        if any(LAYERS[0][1].search(frame) for frame in frames):
            layer = LAYERS[0][0]
        layers[layer] += int(count)
    print(f"{total} samples of the event loop's CPU (idle left out)")
    for name, count in layers.most_common():
        print(f"  {100 * count / total:5.1f}%  {name}")


if __name__ == "__main__":
    main(sys.argv[1])
