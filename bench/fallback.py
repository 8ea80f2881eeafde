"""Fallback latency (issue 14): how long a request takes to its first token when its first
upstream fails and the next one answers, against the same request with no failure.

    .venv/bin/python bench/fallback.py [--requests 200]

Two built-in mock models answer on loopback (no token delay); the gateway runs as a program
with a routing table of both (priority 0, then 1; a breaker that never opens, so that every
request meets the failure). Time to first token = request written -> first content frame read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sse_gateway.mock_upstream import MockModel  # noqa: E402

CASES = {
    "no failure": None,
    "503 head": {"mock_error_status": 503},
    "429 head": {"mock_error_status": 429},
    "error as first event": {"mock_error_event": True},
    "dropped before the first token": {"mock_fail_after": 1},
    "unreachable (connection refused)": "closed",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def first_token(http: aiohttp.ClientSession, url: str) -> float:
    body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": "hello there"}]}
    began = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data: {") and b'"content":"hello' in line:
                elapsed = time.perf_counter() - began
                await response.read()
                return elapsed
    raise RuntimeError("no token came")


async def run_case(name: str, failure, requests: int) -> list[float]:
    primary, secondary = MockModel(token_delay=0), MockModel(token_delay=0)
    await primary.start()
    await secondary.start()
    if isinstance(failure, dict):
        primary.controls = failure
    url0 = f"http://127.0.0.1:{free_port()}/v1" if failure == "closed" else primary.base_url
    routes = [
        {"name": "primary", "url": url0, "models": ["echo"], "rename": "mock-echo", "priority": 0, "max_failures": 10**9},
        {"name": "fallback", "url": secondary.base_url, "models": ["echo"], "rename": "mock-echo", "priority": 1},
    ]
    with tempfile.TemporaryDirectory() as folder:
        table = Path(folder) / "routes.json"
        table.write_text(json.dumps(routes))
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).resolve().parents[1] / "sse_server.py"), f"--port={port}",
            f"--upstreams=@{table}", "--log-level=error", f"--usage-db={folder}/usage.sqlite3",
            stderr=asyncio.subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    await http.get(f"{url}/healthz")
                    break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
            for _ in range(10):  # warm-up
                await first_token(http, url)
            times = [await first_token(http, url) for _ in range(requests)]
        proc.terminate()
        await proc.wait()
    await primary.close()
    await secondary.close()
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    print("| first upstream | TTFT p50 (ms) | p99 (ms) | added by the fallback, p50 (ms) |")
    print("|---|---|---|---|")
    base = None
    for name, failure in CASES.items():
        times = sorted(await run_case(name, failure, args.requests))
        p50, p99 = statistics.median(times) * 1000, times[int(len(times) * 0.99) - 1] * 1000
        base = p50 if base is None else base
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {p50 - base:+.2f} |", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
