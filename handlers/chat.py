"""`POST /v1/chat/completions`: OpenAI-compatible, streaming (SSE) or not (DESIGN.md §4.1, §5)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from sse_gateway import logs
from sse_gateway.chat import ChatRequest, parse_chat_request, with_system_prompt
from sse_gateway.delivery import LogDelivery
from sse_gateway.errors import GatewayError
from sse_gateway.streams import parse_last_event_id
from sse_gateway.upstream import load_upstream_json
from sse_gateway.usage import UsageMeter

from .base import JsonBodyHandler
from .sse import EventStreamMixin


async def accept_chat(handler: JsonBodyHandler, *, force_stream: bool = False) -> ChatRequest:
    """The body as a chat request the caller may make: checked, the model allowed to this user,
    the user's limits not reached, and the server's system prompt in front. The tokens it may
    use are reserved in `handler.reservation`: whoever takes it over settles it, and what is
    left there when the request ends goes back (`JsonBodyHandler.on_finish`)."""
    services = handler.services
    request = parse_chat_request(await handler.read_body(), force_stream=force_stream, caps=services.caps)
    services.policy.check_model(handler.user, request.model)
    handler.reservation = await services.limiter.admit(handler.user, request.payload)
    payload = with_system_prompt(request.payload, services.policy.system_prompt(handler.user, request.model))
    return dataclasses.replace(request, payload=payload)


class ChatCompletionsHandler(JsonBodyHandler, EventStreamMixin):
    _answer: asyncio.Future[bytes] | None = None

    async def post(self) -> None:
        try:
            await self._answer_chat()
        finally:
            self.release_reservation()  # a no-op once the answer's usage settled it

    async def _answer_chat(self) -> None:
        request = await accept_chat(self)
        if not request.stream:
            await self._complete(request)
            return
        await self.stream_answer(request.payload, lambda stream_id: self.services.streams.start(
            stream_id, self.user, request.payload, read=True, reservation=self.reservation))

    async def stream_answer(self, payload: dict[str, Any], start: Callable[[str], None]) -> None:
        """Serve the stream of `payload`: a new one, which `start(stream_id)` sets generating (it
        takes the request's reservation over), or the one this user's same request (by its
        Idempotency-Key) started, from after its Last-Event-ID."""
        streams = self.services.streams
        # Counted as the stream's reader from its creation, so that it never lacks one.
        stream_id, is_new = await streams.open(self.user, payload, self.idempotency_key(), reader=True)
        self.stream_id = stream_id
        logs.stream_id.set(stream_id)
        try:
            position = 0 if is_new else await self._resume_position(stream_id)
            if is_new:
                start(stream_id)
                self.reservation = None  # the stream settles it
            # The head waits for the upstream's, one heartbeat interval at most (§4.1).
            error = await streams.started(stream_id, self.services.settings.heartbeat_interval)
            if error is not None:
                raise error
            if self.services.settings.upstreams:
                await self.name_upstream(stream_id)
        except BaseException:
            await streams.remove_reader(stream_id)
            raise
        delivery = LogDelivery(self.services.store.logs, stream_id, position, self.services.metrics)
        await self.serve_events(delivery, stream_id=stream_id, on_over=lambda: streams.reader_left(stream_id))

    async def _resume_position(self, stream_id: str) -> int:
        """Where a repeated POST (same Idempotency-Key) resumes: after its Last-Event-ID.

        fetch-event-source resumes this way: after a network break it sends the same request
        again, with the id of the last event it got.
        """
        last = self.request.headers.get("Last-Event-ID")
        info = await self.services.store.logs.info(stream_id)
        if not last or info is None:
            return 0
        position = parse_last_event_id(last, info)
        # A client that has it all gets [DONE] once more, so that it can finish.
        return min(position, info.length - 1) if info.ended and not info.lost else position

    async def _complete(self, request: ChatRequest) -> None:
        services = self.services
        # As for a stream: no answer the gateway could not account for (the store keeps usage
        # and limits, and a 503 tells the client to come back, as a streamed request's does).
        await services.store.ping()
        meter = UsageMeter(services.usage, services.prices, self.user, request.model, request.payload["messages"],
                           reservation=self.reservation)  # settled when recorded, else at on_finish
        # As a task, so that a client that hangs up cancels the upstream request too.
        self._answer = asyncio.ensure_future(services.upstream.chat(request.payload))
        try:
            body = await self._answer
        except asyncio.CancelledError:
            await meter.record("cancelled")  # the client is gone: nobody to answer
            return
        except GatewayError as error:
            services.metrics.upstream_errors.labels(error.code or "upstream_error").inc()
            raise
        meter.see_completion(load_upstream_json(body))
        await meter.record()
        self.write_json(body)

    def on_connection_close(self) -> None:
        super().on_connection_close()
        if self._answer is not None:
            self._answer.cancel()
