"""`GET /v1/events`: the user's push channel; `POST /v1/events`: publish to a user (DESIGN.md §4.3)."""

from __future__ import annotations

import orjson

from sse_gateway.push import UserFeed, parse_message_id, parse_publish

from .base import JsonBodyHandler
from .sse import EventStreamMixin


class EventsHandler(JsonBodyHandler, EventStreamMixin):
    public_methods = frozenset({"POST"})  # publishing takes an admin key instead (authenticate_admin)
    cookie_methods = frozenset({"GET"})

    async def get(self) -> None:
        channels, policy = self.services.store.channels, self.services.push_policy
        last = self.request.headers.get("Last-Event-ID") or self.get_query_argument("last_event_id", "")
        after = parse_message_id(last) if last else None
        feed = UserFeed(channels, self.user, after, policy)
        try:
            # Subscribed before the head goes out, so that nothing can slip between; with the
            # store away, the channel opens anyway and subscribes once it is back.
            await feed.subscribe()
        except BaseException:
            feed.close()
            raise
        await self.serve_events(feed)

    async def post(self) -> None:
        body = await self.read_body()
        self.authenticate_admin()
        user, event, data = parse_publish(body)
        policy = self.services.push_policy
        message_id = await self.services.store.channels.publish(user, event, data, policy.retention, policy.keep)
        self.write_json(orjson.dumps({"id": message_id}), 202)
