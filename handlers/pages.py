"""Public routes: `GET /healthz` for probes and load balancers, `GET /` the demo page."""

from __future__ import annotations

from pathlib import Path

from sse_gateway.errors import GatewayError

from .base import ApiHandler


class HealthHandler(ApiHandler):
    """200 while this instance can serve: the shared store (Redis) answers; 503 otherwise.
    `HEAD` answers the same without a body, for probes that send it."""

    public_methods = frozenset({"GET", "HEAD"})
    counts_as_work = False

    async def head(self) -> None:
        await self.get()

    async def get(self) -> None:
        if self.services.draining:
            self.write_json(b'{"status":"draining"}', 503)
            return
        try:
            await self.services.store.ping()
        except GatewayError:
            self.write_json(b'{"status":"unavailable","reason":"store_unavailable"}', 503)
            return
        self.write_json(b'{"status":"ok"}')


PAGE = Path(__file__).resolve().parents[1] / "templates" / "static" / "index.html"

# The page runs only its own built scripts and styles, and talks only to this gateway: even a
# model's answer that slipped past the markdown sanitiser could load or send nothing.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class IndexHandler(ApiHandler):
    """`GET /`: the chat page, as built from templates/ by `make run` (Vite, into templates/static)."""

    public_methods = frozenset({"GET"})

    def get(self) -> None:
        try:
            page = PAGE.read_bytes()
        except FileNotFoundError:
            raise GatewayError(
                503, "The chat page has not been built yet: run `make run` (or `npm ci && npm run build` in templates/).",
                type="server_error", code="page_not_built",
            ) from None
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", PAGE_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-cache")
        self.finish(page)
