"""`GET /v1/models`: the upstream's model list, relayed unchanged."""

from __future__ import annotations

from .base import ApiHandler


class ModelsHandler(ApiHandler):
    async def get(self) -> None:
        self.write_json(await self.services.upstream.models())
