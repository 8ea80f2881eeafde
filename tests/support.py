"""Helpers for tests: request bodies, and an incremental reader of SSE responses."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from typing import Any

import aiohttp

from sse_gateway.decoder import ServerSentEvent, SSEDecoder


def chat_body(text: str = "hello there", *, stream: bool = True, model: str = "mock-echo", **extra: Any) -> dict[str, Any]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": text}], **extra}


class EventReader:
    """Reads an SSE response as it arrives, keeping the raw bytes, comments and events in order."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.raw = bytearray()
        self.comments: list[str] = []
        self.events: list[ServerSentEvent] = []
        self._pending: list[ServerSentEvent] = []
        self._decoder = SSEDecoder(on_comment=self.comments.append)
        self.eof = False

    async def next_event(self) -> ServerSentEvent | None:
        """The next event, or None at the end of the response."""
        while not self._pending:
            if self.eof:
                return None
            data = await self.response.content.readany()
            if not data:
                self.eof = True
                continue
            self.raw += data
            self._pending += self._decoder.feed(data)
        event = self._pending.pop(0)
        self.events.append(event)
        return event

    async def next_comment_or_event(self) -> None:
        """Read until at least one more comment or event has arrived."""
        before = (len(self.comments), len(self.events) + len(self._pending))
        while (len(self.comments), len(self.events) + len(self._pending)) == before and not self.eof:
            data = await self.response.content.readany()
            if not data:
                self.eof = True
            self.raw += data
            self._pending += self._decoder.feed(data)

    async def read_all(self) -> list[ServerSentEvent]:
        while await self.next_event() is not None:
            pass
        return self.events


def content_of(events: list[ServerSentEvent]) -> str:
    """The answer's text: the chunks' delta contents joined, [DONE] and errors excluded."""
    text = []
    for event in events:
        if event.data == "[DONE]":
            continue
        chunk = json.loads(event.data)
        for choice in chunk.get("choices", []):
            text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)


async def stream_chat(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[aiohttp.ClientResponse, EventReader]:
    """POST a chat request and read its whole SSE response."""
    response = await http.post(f"{url}/v1/chat/completions", json=body, headers=headers)
    reader = EventReader(response)
    if response.status == 200:
        await reader.read_all()
    return response, reader


def blocks(raw: bytes) -> list[list[str]]:
    """The raw stream as blocks of lines, each block ended by a blank line."""
    text = raw.decode()
    assert text.endswith("\n\n"), "a stream must end with a complete event"
    return [block.split("\n") for block in text[:-2].split("\n\n")]


class Process:
    """A program under test, started for real; its stderr is collected line by line."""

    def __init__(self, *argv: str, env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Process:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.cwd, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        self._drain = asyncio.ensure_future(self._collect())
        return self

    async def _collect(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._new_line.set()
            self._new_line = asyncio.Event()
        self._new_line.set()

    async def wait_for_line(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        """The first stderr line matching `pattern` (waiting for it to be printed)."""
        regex = re.compile(pattern)

        async def find() -> re.Match[str]:
            seen = 0
            while True:
                event = self._new_line
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                if self._drain.done():
                    raise AssertionError(f"process ended without printing {pattern!r}:\n" + "\n".join(self.lines))
                await event.wait()

        return await asyncio.wait_for(find(), timeout)

    async def stop(self, sig: int | None = signal.SIGTERM, timeout: float = 20) -> int:
        """Send `sig` (None: none, the process is ending by itself) and return the exit status."""
        assert self.proc is not None
        if sig is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._drain
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


async def node_client(url: str, key: str) -> Any:
    """A plain redis-py client on the node that holds `key` (on a cluster, the master of its
    slot): for what is local to a node, such as keyspace notifications."""
    import redis.asyncio

    from sse_gateway.store.redis.connection import connect, is_cluster, node_url

    if not is_cluster(url):
        return redis.asyncio.Redis.from_url(url)
    cluster = connect(url)
    try:
        await cluster.initialize()
        node = cluster.get_node_from_key(key)
        return redis.asyncio.Redis.from_url(node_url(url, node.host, int(node.port)))
    finally:
        await cluster.aclose()
