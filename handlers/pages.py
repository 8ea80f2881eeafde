"""Public routes: `GET /healthz` for probes and load balancers, `GET /` the demo page."""

from __future__ import annotations

from .base import ApiHandler


class HealthHandler(ApiHandler):
    public_methods = frozenset({"GET"})

    def get(self) -> None:
        self.write_json(b'{"status":"ok"}')


class IndexHandler(ApiHandler):
    public_methods = frozenset({"GET"})

    def get(self) -> None:
        self.render("index.html", requires_key=not self.services.keys.open)
