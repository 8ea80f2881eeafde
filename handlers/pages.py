"""Public routes: `GET /healthz` for probes and load balancers, `GET /` the demo page."""

from __future__ import annotations

from sse_gateway.errors import GatewayError

from .base import ApiHandler


class HealthHandler(ApiHandler):
    """200 while this instance can serve: the shared store (Redis) answers; 503 otherwise."""

    public_methods = frozenset({"GET"})

    async def get(self) -> None:
        try:
            await self.services.store.ping()
        except GatewayError:
            self.write_json(b'{"status":"unavailable","reason":"store_unavailable"}', 503)
            return
        self.write_json(b'{"status":"ok"}')


class IndexHandler(ApiHandler):
    public_methods = frozenset({"GET"})

    def get(self) -> None:
        self.render("index.html", requires_key=not self.services.keys.open)
