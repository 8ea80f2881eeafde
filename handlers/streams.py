"""The ticket flow and resume (DESIGN.md §4.2).

`POST /v1/streams` starts a stream and answers with a URL holding a read token, for the
browser's `EventSource`, which can only GET. `GET /v1/streams/<id>` replays the log after
`Last-Event-ID` and follows it live; `DELETE /v1/streams/<id>` stops it.
"""

from __future__ import annotations

import orjson

from sse_gateway import logs
from sse_gateway.delivery import LogDelivery
from sse_gateway.errors import GatewayError
from sse_gateway.store import StreamInfo
from sse_gateway.streams import parse_last_event_id

from .base import JsonBodyHandler
from .chat import accept_chat
from .sse import EventStreamMixin


def stream_not_found() -> GatewayError:
    return GatewayError(404, "No stream with this id; it may have expired.", code="stream_not_found")


class StreamsHandler(JsonBodyHandler):
    async def post(self) -> None:
        try:
            await self._create()
        finally:
            self.release_reservation()  # a no-op once the stream took it over

    async def _create(self) -> None:
        request = await accept_chat(self, force_stream=True)
        streams = self.services.streams
        stream_id, is_new = await streams.open(self.user, request.payload, self.idempotency_key())
        self.stream_id = stream_id
        logs.stream_id.set(stream_id)
        if is_new:
            streams.start(stream_id, self.user, request.payload, reservation=self.reservation)
            self.reservation = None  # the stream settles it
        # Like a streaming chat request, wait (one heartbeat interval at most) for the upstream
        # to accept, so that its refusal is our status rather than an error frame nobody reads.
        info = await streams.wait_started(stream_id, self.services.settings.heartbeat_interval)
        if info is None:
            raise stream_not_found()
        if info.start_error is not None:
            raise info.start_error
        token = await self.services.tickets.issue(stream_id, self.user)
        self.set_header("Location", f"/v1/streams/{stream_id}")
        body = {"id": stream_id, "object": "stream", "url": f"/v1/streams/{stream_id}?token={token}"}
        self.write_json(orjson.dumps(body), status=201)


class StreamHandler(EventStreamMixin):
    ticket_methods = frozenset({"GET"})

    async def get(self, stream_id: str) -> None:
        self.stream_id = stream_id
        logs.stream_id.set(stream_id)
        info = await self._readable(stream_id)
        # The header is the browser's own, newer than a query parameter fixed in the URL.
        last = self.request.headers.get("Last-Event-ID") or self.get_query_argument("last_event_id", "")
        position = parse_last_event_id(last, info) if last else 0
        if info.ended and not info.lost and position == info.length:
            self.set_status(204)  # the reader has everything, [DONE] included: stop reconnecting
            return
        streams = self.services.streams
        await self.name_upstream(stream_id, info)
        await streams.add_reader(stream_id)
        delivery = LogDelivery(self.services.store.logs, stream_id, position, self.services.metrics)
        await self.serve_events(delivery, stream_id=stream_id, on_over=lambda: streams.reader_left(stream_id))

    async def delete(self, stream_id: str) -> None:
        await self._readable(stream_id)
        info = await self.services.streams.stop(stream_id)
        state = info.state.value if info is not None else "cancelled"
        self.write_json(orjson.dumps({"id": stream_id, "object": "stream", "state": state}))

    async def _readable(self, stream_id: str) -> StreamInfo:
        info = await self.services.store.logs.info(stream_id)
        if info is None:
            raise stream_not_found()
        if self.ticket is not None and self.ticket.stream_id != stream_id:
            raise GatewayError(403, "This read token is for another stream.", type="permission_error",
                               code="token_for_another_stream")
        if info.owner != self.user:
            raise GatewayError(403, "This stream belongs to another user.", type="permission_error",
                               code="not_your_stream")
        return info
