"""Graceful shutdown and several processes, with the real program (`sse_server.py`)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from support import EventReader, chat_body, content_of

REPO = Path(__file__).resolve().parents[1]


async def start(programs, *flags: str):
    server = await programs(sys.executable, str(REPO / "sse_server.py"), "--port=0", "--mock-token-delay=0", *flags)
    return server, (await server.wait_for_line(r"listening on (http://[\d.]+:\d+)")).group(1)


async def refused(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as fresh:  # a new connection, not a pooled one
            await fresh.get(f"{url}/healthz")
    except aiohttp.ClientConnectorError:
        return True
    return False


async def open_streams(http, url: str, count: int, words: int, delay: float) -> list[tuple[str, EventReader]]:
    texts = [" ".join(f"s{n}w{i}" for i in range(words)) for n in range(count)]
    responses = await asyncio.gather(*(
        http.post(f"{url}/v1/chat/completions", json=chat_body(text, mock_token_delay=delay)) for text in texts
    ))
    readers = [EventReader(response) for response in responses]
    for reader in readers:
        assert await reader.next_event() is not None  # every one is streaming
    return list(zip(texts, readers, strict=True))


async def test_sigterm_during_twenty_streams_lets_them_all_finish(programs, http):
    server, url = await start(programs, "--drain-timeout=30")
    streams = await open_streams(http, url, 20, words=30, delay=0.05)
    # A connection opened before the signal stays open: /healthz on it turns to 503.
    assert (await http.get(f"{url}/healthz")).status == 200
    server.proc.send_signal(signal.SIGTERM)
    await server.wait_for_line(r"draining 20 running stream")
    assert await refused(url)
    health = await http.get(f"{url}/healthz")
    assert health.status == 503 and (await health.json())["status"] == "draining"
    for text, reader in streams:
        events = await reader.read_all()
        assert content_of(events) == text and events[-1].data == "[DONE]"
    assert await server.stop(sig=None) == 0


async def test_streams_still_running_at_the_deadline_are_told_to_resume(programs, http):
    server, url = await start(programs, "--drain-timeout=1")
    streams = await open_streams(http, url, 3, words=400, delay=0.05)  # 20 s each: past the deadline
    server.proc.send_signal(signal.SIGTERM)
    for _text, reader in streams:
        events = await asyncio.wait_for(reader.read_all(), timeout=10)
        error = json.loads(events[-2].data)["error"]
        assert error["code"] == "gateway_restarting" and "Last-Event-ID" in error["message"]
        assert events[-1].data == "[DONE]"
    assert await server.stop(sig=None) == 0


async def test_a_second_signal_ends_the_drain_at_once(programs, http):
    server, url = await start(programs, "--drain-timeout=60")
    streams = await open_streams(http, url, 2, words=400, delay=0.05)
    server.proc.send_signal(signal.SIGTERM)
    await server.wait_for_line(r"draining 2 running stream")
    server.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(server.stop(sig=None), timeout=5) == 0  # not the 60 s of the drain
    for _text, reader in streams:
        events = await reader.read_all()
        assert json.loads(events[-2].data)["error"]["code"] == "gateway_restarting"


async def test_several_processes_share_one_port(programs, http, redis_url):
    server, url = await start(programs, "--processes=3", f"--redis-url={redis_url}", "--session-secret=shared")
    await server.wait_for_line(r"3 worker processes started")
    streams = await open_streams(http, url, 20, words=10, delay=0.01)
    for text, reader in streams:
        assert content_of(await reader.read_all()) == text
    # One worker's stream, resumed through whichever worker the kernel picks.
    created = await (await http.post(f"{url}/v1/streams", json=chat_body("shared by the workers"))).json()
    assert content_of(await EventReader(await http.get(f"{url}{created['url']}")).read_all()) == "shared by the workers"
    workers = [int(pid) for pid in os.popen(f"pgrep -P {server.proc.pid}").read().split()]
    assert len(workers) == 3
    assert await server.stop() == 0
    for pid in workers:  # no worker outlives the parent
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_several_processes_need_redis(capsys):
    from sse_gateway.config import parse_settings

    with pytest.raises(SystemExit):
        parse_settings(["--processes=2"], env={})
    assert "needs --redis-url" in capsys.readouterr().err
