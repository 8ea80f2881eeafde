"""Write-to-receive latency of chunks through the gateway (DESIGN.md §6).

An upstream in this process stamps every chunk with the moment it writes it; the gateway runs
as its own process (`sse_server.py`), as in production; clients in this process note when each
chunk arrives. For each level of concurrency it prints the latency percentiles of every chunk,
the time to the first chunk, and the chunks relayed per second.

    .venv/bin/python bench/latency.py [--streams 1,50,200] [--chunks 100] [--delay 0.01] [--redis-url=redis://…]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sse_gateway.decoder import SSEDecoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def stamped_upstream(chunks: int, delay: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(chunks):
            await asyncio.sleep(delay)
            obj = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": str(time.perf_counter_ns())},
                   "finish_reason": "stop" if index == chunks - 1 else None}]}
            await response.write(b"data: " + orjson.dumps(obj) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def one_stream(session: aiohttp.ClientSession, url: str, latencies: list[float], first: list[float]) -> int:
    started = time.perf_counter_ns()
    body = {"model": "bench", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    count = 0
    async with session.post(f"{url}/v1/chat/completions", json=body) as response:
        decoder = SSEDecoder()
        async for data in response.content.iter_any():
            now = time.perf_counter_ns()
            for event in decoder.feed(data):
                if event.data == "[DONE]":
                    continue
                sent = int(orjson.loads(event.data)["choices"][0]["delta"]["content"])
                latencies.append((now - sent) / 1e6)
                if count == 0:
                    first.append((now - started) / 1e6)
                count += 1
    return count


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentiles(values: list[float]) -> str:
    values = sorted(values)
    pick = lambda q: values[min(len(values) - 1, int(q * len(values)))]  # noqa: E731
    return f"p50 {pick(0.50):6.2f}  p90 {pick(0.90):6.2f}  p99 {pick(0.99):6.2f}  max {values[-1]:6.2f} ms"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", default="1,50,200", help="concurrency levels, comma-separated")
    parser.add_argument("--chunks", type=int, default=100, help="chunks per stream")
    parser.add_argument("--delay", type=float, default=0.01, help="seconds between upstream chunks")
    parser.add_argument("--redis-url", default=None, help="run the gateway on this Redis (default: in-memory)")
    args = parser.parse_args()

    runner = web.AppRunner(stamped_upstream(args.chunks, args.delay), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    upstream_port = runner.addresses[0][1]

    store = [f"--redis-url={args.redis_url}"] if args.redis_url else []
    gateway = await asyncio.create_subprocess_exec(
        sys.executable, str(REPO / "sse_server.py"), "--port=0", *store, "--usage-db=/tmp/sse-bench-usage.sqlite3",
        f"--upstream-url=http://127.0.0.1:{upstream_port}/v1", stderr=asyncio.subprocess.PIPE,
    )
    url = None
    assert gateway.stderr is not None
    async for line in gateway.stderr:
        if match := re.search(rb"listening on (http://[\d.]+:\d+)", line):
            url = match.group(1).decode()
            break
    assert url, "the gateway did not start"
    log_lines = asyncio.ensure_future(gateway.stderr.read())  # keep its log pipe from filling up

    print(f"{args.chunks} chunks per stream, {args.delay * 1000:g} ms apart; store: {args.redis_url or 'memory'}")
    try:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            for streams in (int(n) for n in args.streams.split(",")):
                latencies: list[float] = []
                first: list[float] = []
                started = time.perf_counter()
                cpu_before = cpu_seconds(gateway.pid)
                counts = await asyncio.gather(*(one_stream(session, url, latencies, first) for _ in range(streams)))
                elapsed = time.perf_counter() - started
                gateway_cpu = cpu_seconds(gateway.pid) - cpu_before
                assert all(c == args.chunks for c in counts), counts
                print(
                    f"{streams:4d} streams: chunk latency {percentiles(latencies)} | "
                    f"first chunk p50 {statistics.median(first):6.2f} ms | {sum(counts) / elapsed:6.0f} chunks/s | "
                    f"gateway CPU {1e6 * gateway_cpu / sum(counts):5.1f} µs/chunk"
                )
    finally:
        gateway.terminate()
        await gateway.wait()
        await log_lines
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
