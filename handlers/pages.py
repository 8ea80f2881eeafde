"""Public routes: `GET /healthz` for probes and load balancers, `GET /` the demo page."""

from __future__ import annotations

from sse_gateway.errors import GatewayError
from sse_gateway.page import INDEX

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


# The page runs only its own built scripts and styles, and talks only to this gateway: even a
# model's answer that slipped past the markdown sanitiser could load or send nothing.
PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class IndexHandler(ApiHandler):
    """`GET /`: the chat page, as built from templates/ (Vite, into sse_gateway/static)."""

    public_methods = frozenset({"GET"})

    def get(self) -> None:
        try:
            page = INDEX.read_bytes()
        except FileNotFoundError:  # only in a checkout where someone removed the build
            raise GatewayError(
                503, "The chat page is missing from sse_gateway/static: run `make page` (needs Node.js).",
                type="server_error", code="page_not_built",
            ) from None
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Security-Policy", PAGE_POLICY)
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-cache")
        self.finish(page)
