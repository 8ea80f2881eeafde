"""Everything a handler depends on, built once per application (DESIGN.md §2).

`Services.build(settings)` makes the real parts; tests may build their own with other parts.
Nothing here is global: two applications in one process (as in the tests) share nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .access import IdempotencyKeys, ReadTickets, Sessions
from .auth import ApiKeys
from .chat import RequestCaps
from .config import Settings
from .cors import CorsPolicy
from .heartbeat import HeartbeatSweeper
from .limits import Limiter
from .metrics import Metrics
from .mock_upstream import MockModel
from .policy import Policy, UserPolicy, parse_policy
from .producer import LogPolicy
from .push import PushPolicy
from .store import Store
from .store.memory import MemoryStore
from .streams import StreamRegistry
from .upstream import UpstreamClient
from .usage import Prices, SqliteUsageBook, UsageBook

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
    policy: Policy
    limiter: Limiter
    usage: UsageBook
    prices: Prices
    metrics: Metrics
    caps: RequestCaps
    mock: MockModel | None = None  # the embedded mock model, when no --upstream-url is given
    active_requests: int = 0  # API requests being served now (--max-connections)
    draining: bool = False  # set at SIGTERM: finish what runs, take nothing new

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
        usage: UsageBook
        if settings.redis_url:
            # Only deployments with Redis need redis-py loaded.
            from .store.redis import RedisStore
            from .usage import RedisUsageBook

            store = RedisStore(settings.redis_url)
            usage = RedisUsageBook(store.client)
        else:
            store = MemoryStore()
            usage = SqliteUsageBook(settings.usage_db)
        log_policy = LogPolicy(retention=settings.stream_retention, max_events=settings.stream_max_events,
                               max_lifetime=settings.max_stream_lifetime)
        idempotency = IdempotencyKeys(store, ttl=settings.stream_retention + IDEMPOTENCY_MARGIN)
        default = UserPolicy(
            requests_per_minute=settings.requests_per_minute,
            tokens_per_day=settings.tokens_per_day,
            concurrent_streams=settings.concurrent_streams,
            models=frozenset(settings.models) if settings.models else None,
            system_prompt=settings.system_prompt,
        )
        users, model_prompts = parse_policy(settings.policy) if settings.policy else ({}, {})
        policy = Policy(default, users, model_prompts)
        metrics = Metrics()
        prices = Prices(settings.prices)
        limiter = Limiter(store, usage, policy, metrics)
        streams = StreamRegistry(store, upstream, log_policy, idempotency, limiter=limiter, usage=usage,
                                 prices=prices, metrics=metrics, resume_grace=settings.resume_grace)
        return cls(
            settings=settings,
            keys=ApiKeys(settings.api_keys),
            admin_keys=ApiKeys({key: "admin" for key in settings.admin_keys}),
            cors=CorsPolicy(settings.cors_origins),
            upstream=upstream,
            store=store,
            streams=streams,
            tickets=ReadTickets(store, ttl=settings.ticket_ttl),
            sessions=Sessions(store, ttl=settings.session_ttl),
            push_policy=PushPolicy(retention=settings.events_retention, keep=settings.events_max),
            sweeper=HeartbeatSweeper(settings.heartbeat_interval, settings.write_timeout),
            policy=policy,
            limiter=limiter,
            usage=usage,
            prices=prices,
            metrics=metrics,
            caps=RequestCaps(settings.max_messages, settings.max_message_size, settings.max_tokens),
            mock=mock,
        )

    async def close(self) -> None:
        """Stop streams, close the upstream session and the embedded mock model."""
        await self.streams.close()
        await self.sweeper.close()
        await self.upstream.close()
        await self.store.close()
        await self.usage.close()
        if self.mock is not None:
            await self.mock.close()
