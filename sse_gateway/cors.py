"""CORS: an explicit origin allowlist (DESIGN.md §4.4).

A listed origin is echoed with `Access-Control-Allow-Credentials: true`, so that `EventSource`
with credentials and fetch with cookies work from it. `*` in the list lets any other origin read
responses without credentials: the two are never combined, as the Fetch standard forbids.
Every response says `Vary: Origin`, so that no cache hands one origin's answer to another.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CorsPolicy"]

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, Last-Event-ID, Idempotency-Key"
EXPOSE_HEADERS = "X-Stream-Id, X-Request-Id, X-Upstream, Retry-After"
MAX_AGE = "600"


class CorsPolicy:
    def __init__(self, origins: Iterable[str]) -> None:
        origins = tuple(origins)
        self._any = "*" in origins
        self._listed = frozenset(o for o in origins if o != "*")

    def allows(self, origin: str | None) -> bool:
        return bool(origin) and (self._any or origin in self._listed)

    def headers(self, origin: str | None) -> list[tuple[str, str]]:
        """Headers for an actual (non-preflight) response to a request from `origin`."""
        headers = [("Vary", "Origin")]
        if not origin:
            return headers
        if origin in self._listed:
            headers += [
                ("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                ("Access-Control-Expose-Headers", EXPOSE_HEADERS),
            ]
        elif self._any:
            headers += [("Access-Control-Allow-Origin", "*"), ("Access-Control-Expose-Headers", EXPOSE_HEADERS)]
        return headers

    def preflight_headers(self, origin: str | None) -> list[tuple[str, str]] | None:
        """Headers answering a preflight from `origin`, or None when the origin is not allowed."""
        if not self.allows(origin):
            return None
        headers = [h for h in self.headers(origin) if h[0] != "Access-Control-Expose-Headers"]
        return headers + [
            ("Access-Control-Allow-Methods", ALLOW_METHODS),
            ("Access-Control-Allow-Headers", ALLOW_HEADERS),
            ("Access-Control-Max-Age", MAX_AGE),
        ]
