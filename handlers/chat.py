"""`POST /v1/chat/completions`: OpenAI-compatible, streaming (SSE) or not (DESIGN.md §4.1, §5)."""

from __future__ import annotations

import asyncio

from sse_gateway.chat import ChatRequest, parse_chat_request

from .base import JsonBodyHandler
from .sse import EventStreamMixin


class ChatCompletionsHandler(JsonBodyHandler, EventStreamMixin):
    _answer: asyncio.Future[bytes] | None = None

    async def post(self) -> None:
        request = parse_chat_request(await self.read_body())
        if not request.stream:
            await self._complete(request)
            return
        streams = self.services.streams
        stream_id, is_new = await streams.open(self.user, request.payload, self.idempotency_key())
        # Attach before the producer starts, so that the stream is never without a reader (§5).
        reader = await streams.attach(stream_id)
        try:
            if is_new:
                streams.start(stream_id, request.payload)
            await self.serve_events(reader, stream_id=stream_id, wait_for_upstream=True)
        finally:
            await streams.detach(reader)

    async def _complete(self, request: ChatRequest) -> None:
        # As a task, so that a client that hangs up cancels the upstream request too.
        self._answer = asyncio.ensure_future(self.services.upstream.chat(request.payload))
        try:
            body = await self._answer
        except asyncio.CancelledError:
            return  # the client is gone: nobody to answer
        self.write_json(body)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self._answer is not None:
            self._answer.cancel()
