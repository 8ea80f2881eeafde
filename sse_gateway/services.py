"""Everything a handler depends on, built once per application (DESIGN.md §2).

`Services.build(settings)` makes the real parts; tests may build their own with other parts.
Nothing here is global: two applications in one process (as in the tests) share nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .access import IdempotencyKeys, ReadTickets, Sessions
from .auth import ApiKeys
from .config import Settings
from .cors import CorsPolicy
from .heartbeat import HeartbeatSweeper
from .mock_upstream import MockModel
from .producer import LogPolicy
from .push import PushPolicy
from .store import Store
from .store.memory import MemoryStore
from .streams import StreamRegistry
from .upstream import UpstreamClient

# An Idempotency-Key is remembered this long beyond a finished stream's retention, so that it
# outlives the generation it started.
IDEMPOTENCY_MARGIN = 3600.0

__all__ = ["Services"]


@dataclass
class Services:
    settings: Settings
    keys: ApiKeys
    admin_keys: ApiKeys
    cors: CorsPolicy
    upstream: UpstreamClient
    store: Store
    streams: StreamRegistry
    tickets: ReadTickets
    sessions: Sessions
    push_policy: PushPolicy
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
        store: Store
        if settings.redis_url:
            from .store.redis import RedisStore  # only deployments with Redis need redis-py loaded

            store = RedisStore(settings.redis_url)
        else:
            store = MemoryStore()
        policy = LogPolicy(retention=settings.stream_retention, max_events=settings.stream_max_events)
        idempotency = IdempotencyKeys(store, ttl=settings.stream_retention + IDEMPOTENCY_MARGIN)
        return cls(
            settings=settings,
            keys=ApiKeys(settings.api_keys),
            admin_keys=ApiKeys({key: "admin" for key in settings.admin_keys}),
            cors=CorsPolicy(settings.cors_origins),
            upstream=upstream,
            store=store,
            streams=StreamRegistry(store, upstream, policy, idempotency, resume_grace=settings.resume_grace),
            tickets=ReadTickets(store, ttl=settings.ticket_ttl),
            sessions=Sessions(store, ttl=settings.session_ttl),
            push_policy=PushPolicy(retention=settings.events_retention, keep=settings.events_max),
            sweeper=HeartbeatSweeper(settings.heartbeat_interval),
            mock=mock,
        )

    async def close(self) -> None:
        """Stop streams, close the upstream session and the embedded mock model."""
        await self.streams.close()
        await self.sweeper.close()
        await self.upstream.close()
        await self.store.close()
        if self.mock is not None:
            await self.mock.close()
