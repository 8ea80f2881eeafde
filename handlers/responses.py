"""`POST /v1/responses`: the Responses API, streamed or not; `GET /v1/responses/<id>`, `DELETE`,
and `POST /v1/responses/<id>/cancel` passed through to the upstream, for the answer's owner only
(DESIGN.md §4.6).

A streamed answer runs exactly as a streamed chat answer does (the stream log, heartbeats, the
head waiting for the upstream's, resume by `X-Stream-Id` and `Last-Event-ID`, stop, grace); only
its dialect differs: named events, ended by the upstream's terminal event (responses.py).
"""

from __future__ import annotations

import asyncio
import dataclasses

from sse_gateway.errors import GatewayError
from sse_gateway.responses import (
    PATH,
    RESPONSES,
    ResponsesMeter,
    ResponsesRequest,
    input_text,
    parse_responses_request,
    with_instructions,
)
from sse_gateway.upstream import load_upstream_json

from .base import ApiHandler
from .chat import ChatCompletionsHandler


class ResponsesHandler(ChatCompletionsHandler):
    async def post(self) -> None:
        try:
            await self._respond()
        finally:
            self.release_reservation()  # a no-op once the answer's usage settled it

    async def _accept(self) -> ResponsesRequest:
        """The body as a request this user may make (as `accept_chat` does for chat): its model
        allowed, a `previous_response_id` of the user's own, limits not reached, the server's
        system prompt ahead of the caller's `instructions`."""
        services = self.services
        request = parse_responses_request(await self.read_body(), services.caps)
        services.policy.check_model(self.user, request.model)
        previous = request.payload.get("previous_response_id")
        if previous is not None:
            await services.response_owners.check(self.user, previous, param="previous_response_id")
        self.reservation = await services.limiter.admit(self.user, request.payload)
        payload = with_instructions(request.payload, services.policy.system_prompt(self.user, request.model))
        return dataclasses.replace(request, payload=payload)

    def _meter(self, request: ResponsesRequest, *, remember: bool) -> ResponsesMeter:
        services, user = self.services, self.user
        keep = remember and request.payload.get("store") is not False  # store: false -> nothing to GET later

        def created(response_id: str) -> None:
            if keep:
                services.streams.producers.spawn(services.response_owners.remember(user, response_id))

        return ResponsesMeter(services.usage, services.prices, user, request.model,
                              [{"content": input_text(request.payload)}], reservation=self.reservation,
                              on_created=created)

    async def _respond(self) -> None:
        request = await self._accept()
        if not request.stream:
            await self._complete_response(request)
            return
        meter = self._meter(request, remember=True)
        await self.stream_answer(request.payload, lambda stream_id: self.services.streams.start(
            stream_id, self.user, request.payload, read=True, reservation=self.reservation, meter=meter,
            dialect=RESPONSES))

    async def _complete_response(self, request: ResponsesRequest) -> None:
        services = self.services
        await services.store.ping()
        meter = self._meter(request, remember=False)
        self._answer = asyncio.ensure_future(services.upstream.call("POST", PATH, request.payload))
        try:
            body = await self._answer
        except asyncio.CancelledError:
            await meter.record("cancelled")
            return
        except GatewayError as error:
            services.metrics.upstream_errors.labels(error.code or "upstream_error").inc()
            raise
        response = load_upstream_json(body)
        if isinstance(response, dict):
            meter.see_completion(response)
            if isinstance(response.get("id"), str) and request.payload.get("store") is not False:
                await services.response_owners.remember(self.user, response["id"])
        await meter.record()
        self.write_json(body)


class ResponseHandler(ApiHandler):
    """One stored answer at the upstream: read or delete it, for its owner."""

    async def get(self, response_id: str) -> None:
        await self.services.response_owners.check(self.user, response_id)
        self.write_json(await self.services.upstream.call("GET", f"{PATH}/{response_id}"))

    async def delete(self, response_id: str) -> None:
        await self.services.response_owners.check(self.user, response_id)
        self.write_json(await self.services.upstream.call("DELETE", f"{PATH}/{response_id}"))


class ResponseCancelHandler(ApiHandler):
    """`POST /v1/responses/<id>/cancel` (a background answer at the upstream), for its owner."""

    async def post(self, response_id: str) -> None:
        await self.services.response_owners.check(self.user, response_id)
        self.write_json(await self.services.upstream.call("POST", f"{PATH}/{response_id}/cancel"))
