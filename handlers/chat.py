"""`POST /v1/chat/completions`: OpenAI-compatible, streaming (SSE) or not (DESIGN.md §4.1, §5)."""

from __future__ import annotations

import asyncio

from sse_gateway.chat import ChatRequest, parse_chat_request
from sse_gateway.streams import parse_last_event_id

from .base import JsonBodyHandler
from .sse import EventStreamMixin


class ChatCompletionsHandler(JsonBodyHandler, EventStreamMixin):
    _answer: asyncio.Future[bytes] | None = None

    async def post(self) -> None:
        body = await self.read_body()
        request = parse_chat_request(body, system_prompt=self.services.settings.system_prompt)
        if not request.stream:
            await self._complete(request)
            return
        streams = self.services.streams
        stream_id, is_new = await streams.open(self.user, request.payload, self.idempotency_key())
        position = 0 if is_new else await self._resume_position(stream_id)
        # Attach before the producer starts, so that the stream is never without a reader (§5).
        reader = await streams.attach(stream_id, position)
        try:
            if is_new:
                streams.start(stream_id, request.payload)
            await self.serve_events(reader, stream_id=stream_id, wait_for_upstream=True)
        finally:
            await streams.detach(reader)

    async def _resume_position(self, stream_id: str) -> int:
        """Where a repeated POST (same Idempotency-Key) resumes: after its Last-Event-ID.

        fetch-event-source resumes this way: after a network break it sends the same request
        again, with the id of the last event it got.
        """
        last = self.request.headers.get("Last-Event-ID")
        info = await self.services.store.stream_info(stream_id)
        if not last or info is None:
            return 0
        position = parse_last_event_id(last, info)
        # A client that has it all gets [DONE] once more, so that it can finish.
        return min(position, info.length - 1) if info.ended else position

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
