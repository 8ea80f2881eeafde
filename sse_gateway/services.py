"""Everything a handler depends on, built once per application (DESIGN.md §2).

`Services.build(settings)` makes the real parts; tests may build their own with other parts.
Nothing here is global: two applications in one process (as in the tests) share nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .auth import ApiKeys
from .config import Settings
from .cors import CorsPolicy
from .heartbeat import HeartbeatSweeper
from .mock_upstream import MockModel
from .streams import StreamRegistry
from .upstream import UpstreamClient

__all__ = ["Services"]


@dataclass
class Services:
    settings: Settings
    keys: ApiKeys
    cors: CorsPolicy
    upstream: UpstreamClient
    streams: StreamRegistry
    sweeper: HeartbeatSweeper
    mock: MockModel | None = None  # the embedded mock model, when no --upstream-url is given

    @classmethod
    def build(cls, settings: Settings) -> Services:
        mock = None
        base_url: str | Callable[[], Awaitable[str]]
        if settings.upstream_url is None:
            # Started on first use, inside the running loop, on a free loopback port.
            mock = MockModel(token_delay=settings.mock_token_delay)
            base_url = mock.start
        else:
            base_url = settings.upstream_url
        upstream = UpstreamClient(
            base_url,
            api_key=settings.upstream_api_key,
            connect_timeout=settings.upstream_connect_timeout,
            idle_timeout=settings.upstream_idle_timeout,
        )
        return cls(
            settings=settings,
            keys=ApiKeys(settings.api_keys),
            cors=CorsPolicy(settings.cors_origins),
            upstream=upstream,
            streams=StreamRegistry(),
            sweeper=HeartbeatSweeper(settings.heartbeat_interval),
            mock=mock,
        )

    async def close(self) -> None:
        """Stop streams, close the upstream session and the embedded mock model."""
        await self.streams.close()
        await self.sweeper.close()
        await self.upstream.close()
        if self.mock is not None:
            await self.mock.close()
