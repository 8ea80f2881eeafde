"""`POST /v1/chat/completions`: OpenAI-compatible, streaming (SSE) or not (DESIGN.md §4.1, §5)."""

from __future__ import annotations

import asyncio
import logging

from tornado.iostream import StreamClosedError

from sse_gateway.chat import ChatRequest, parse_chat_request
from sse_gateway.frames import encode_retry
from sse_gateway.producer import produce
from sse_gateway.streams import Reader, Stream

from .base import JsonBodyHandler

log = logging.getLogger("sse_gateway.http")


class ChatCompletionsHandler(JsonBodyHandler):
    _reader: Reader | None = None
    _answer: asyncio.Task[bytes] | None = None

    async def post(self) -> None:
        request = parse_chat_request(self.read_body())
        if request.stream:
            await self._stream(request)
        else:
            await self._complete(request)

    async def _complete(self, request: ChatRequest) -> None:
        # As a task, so that a client that hangs up cancels the upstream request too.
        self._answer = asyncio.ensure_future(self.services.upstream.chat(request.payload))
        try:
            body = await self._answer
        except asyncio.CancelledError:
            return  # the client is gone: nobody to answer
        self.write_json(body)

    async def _stream(self, request: ChatRequest) -> None:
        services = self.services
        stream = services.streams.create(owner=self.user)
        # Subscribe before the producer starts, so that no early token is missed (§5 step 2).
        reader = self._reader = services.streams.attach(stream)
        services.streams.start(stream, produce(stream, services.upstream, request.payload))
        services.sweeper.add(reader)  # heartbeats count from the request's arrival
        try:
            error = await reader.wait_until_started()
            if error is not None:
                raise error  # failed before the upstream's head: its status is ours
            if reader.closed:
                return
            await self._relay(stream, reader)
        finally:
            services.sweeper.discard(reader)
            services.streams.detach(reader)

    async def _relay(self, stream: Stream, reader: Reader) -> None:
        """Commit the 200 head with `retry:`, then write every batch of frames with one flush."""
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # nginx: do not buffer this response
        self.set_header("X-Stream-Id", stream.id)
        # Tornado leaves Nagle's algorithm on while a response streams (DESIGN.md §6).
        self.connection.stream.set_nodelay(True)
        self.write(encode_retry(self.services.settings.retry_ms))
        try:
            await self.flush()
            while (batch := await reader.next_batch()) is not None:
                self.write(batch)
                await self.flush()
        except StreamClosedError:
            reader.close()

    def on_connection_close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._answer is not None:
            self._answer.cancel()
