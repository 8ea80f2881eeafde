"""Routes for operators: `GET /metrics` (Prometheus), `GET /v1/usage` (usage and cost)."""

from __future__ import annotations

import orjson

from sse_gateway.metrics import CONTENT_TYPE_LATEST
from sse_gateway.usage import report

from .base import ApiHandler


class MetricsHandler(ApiHandler):
    """Prometheus text format. Public like /healthz: keep it off the internet at the proxy
    (deploy/nginx.conf allows it from the local host only)."""

    public_methods = frozenset({"GET"})
    counts_as_work = False

    def get(self) -> None:
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.services.metrics.render())


class UsageHandler(ApiHandler):
    """A user's own usage; with `?user=<id>` and an admin key, anyone's (DESIGN.md §4.4)."""

    public_methods = frozenset({"GET"})  # authenticated below: as a user, or as an admin

    async def get(self) -> None:
        who = self.get_query_argument("user", None)
        if who is not None:
            self.authenticate_admin()
        else:
            await self.authenticate()
            who = self.user
        rows = await self.services.usage.rows(who)
        self.write_json(orjson.dumps(report(who, rows)))
