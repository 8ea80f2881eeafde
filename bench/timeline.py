"""Where a lone request's time to first token goes (bench/profile.sh timeline).

Runs the gateway with clock readings taken at the steps of a chat request, one request at a
time (the load is one stream after another), and on SIGUSR1 writes the median time between
consecutive steps to $TIMELINE_OUT:

    python bench/timeline.py sse_server.py --port=... --upstream-url=...

The steps wrap methods of Tornado, aiohttp and the gateway; a wrapper costs about a microsecond.
"""

from __future__ import annotations

import functools
import os
import runpy
import signal
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.getcwd())

import aiohttp.client_proto  # noqa: E402
import aiohttp.client_reqrep  # noqa: E402
import tornado.httpserver  # noqa: E402
import tornado.iostream  # noqa: E402
import tornado.routing  # noqa: E402
import tornado.web  # noqa: E402

import handlers.base  # noqa: E402
import handlers.chat  # noqa: E402
import handlers.wire  # noqa: E402
import sse_gateway.streams  # noqa: E402
import sse_gateway.upstream  # noqa: E402

STEPS = [
    ("accept", "the connection is handed to Tornado"),
    ("first_read", "Tornado reads the request"),
    ("headers", "the request's head is parsed; routing"),
    ("handler", "the handler is created"),
    ("prepared", "the handler's prepare() (authentication, CORS, limits) is done"),
    ("body", "the body arrives at the handler"),
    ("post", "post() runs"),
    ("accepted", "the request is validated, the model and limits checked"),
    ("opened", "the stream is created in the store"),
    ("upstream", "the producer calls the upstream"),
    ("sent", "aiohttp sends the request"),
    ("upstream_head", "the upstream's first bytes arrive"),
    ("head_read", "aiohttp has the response head"),
    ("writer", "the gateway's head goes out"),
]
requests: list[dict[str, int]] = []
current: dict[str, int] = {}


def mark(step: str) -> None:
    current.setdefault(step, time.perf_counter_ns())


def at_start(owner: Any, name: str, step: str) -> None:
    original = getattr(owner, name)
    if hasattr(original, "__code__") and original.__code__.co_flags & 0x80:  # a coroutine function
        @functools.wraps(original)
        async def wrapped_async(*args: Any, **kwargs: Any) -> Any:
            mark(step)
            return await original(*args, **kwargs)
        setattr(owner, name, wrapped_async)
    else:
        @functools.wraps(original)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            mark(step)
            return original(*args, **kwargs)
        setattr(owner, name, wrapped)


def at_end(owner: Any, name: str, step: str) -> None:
    original = getattr(owner, name)

    @functools.wraps(original)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = await original(*args, **kwargs)
        mark(step)
        return result
    setattr(owner, name, wrapped)


def handle_stream(original: Any) -> Any:
    def wrapped(self: Any, stream: Any, address: Any) -> Any:
        global current
        if current:
            requests.append(current)
        current = {"accept": time.perf_counter_ns()}
        return original(self, stream, address)
    return wrapped


tornado.httpserver.HTTPServer.handle_stream = handle_stream(tornado.httpserver.HTTPServer.handle_stream)
for owner, name, step, at in [
    (tornado.iostream.BaseIOStream, "_read_to_buffer_loop", "first_read", at_start),
    (tornado.routing._RoutingDelegate, "headers_received", "headers", at_start),
    (tornado.web.RequestHandler, "__init__", "handler", at_start),
    (handlers.base.JsonBodyHandler, "prepare", "prepared", at_end),
    (handlers.base.JsonBodyHandler, "data_received", "body", at_start),
    (handlers.chat.ChatCompletionsHandler, "post", "post", at_start),
    (handlers.chat, "accept_chat", "accepted", at_end),
    (sse_gateway.streams.Streams, "open", "opened", at_end),
    (sse_gateway.upstream.UpstreamClient, "open_chat_stream", "upstream", at_start),
    (aiohttp.client_reqrep.ClientRequest, "send", "sent", at_start),
    (aiohttp.client_proto.ResponseHandler, "data_received", "upstream_head", at_start),
    (sse_gateway.upstream.UpstreamClient, "open_chat_stream", "head_read", at_end),
    (handlers.wire.EventWriter, "__init__", "writer", at_start),
]:
    at(owner, name, step)


def report(*_: Any) -> None:
    complete = [r for r in requests if all(step in r for step, _ in STEPS)]
    lines = [f"{len(complete)} requests; median µs from the step before:"]
    for (before, _), (step, meaning) in zip(STEPS, STEPS[1:], strict=False):
        median = statistics.median((r[step] - r[before]) / 1000 for r in complete) if complete else float("nan")
        lines.append(f"{median:8.1f}  {step:<14} {meaning}")
    total = statistics.median((r["sent"] - r["accept"]) / 1000 for r in complete) if complete else float("nan")
    lines.append(f"{total:8.1f}  from accept to the upstream request")
    with open(os.environ.get("TIMELINE_OUT", "timeline.txt"), "w") as out:
        out.write("\n".join(lines) + "\n")
    os._exit(0)


signal.signal(signal.SIGUSR1, report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
