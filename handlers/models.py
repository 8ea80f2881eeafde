"""`GET /v1/models`: the upstream's model list, relayed unchanged."""

from __future__ import annotations

import orjson

from .base import ApiHandler


class ModelsHandler(ApiHandler):
    """The upstream's list, less the models this user may not ask for (--models, --policy)."""

    async def get(self) -> None:
        body = await self.services.upstream.models()
        if self.services.policy.for_user(self.user).models is not None:
            listing = orjson.loads(body)
            listing["data"] = [m for m in listing.get("data", []) if self.services.policy.allows(self.user, m.get("id"))]
            body = orjson.dumps(listing)
        self.write_json(body)
