"""Everything a handler depends on, built once per application (DESIGN.md §2).

`Services.build(settings)` makes the real parts; tests may build their own with other parts.
Nothing here is global: two applications in one process (as in the tests) share nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .access import IdempotencyKeys, ReadTickets, ResponseOwners, Sessions
from .auth import ApiKeys
from .chat import RequestCaps
from .config import Settings
from .cors import CorsPolicy
from .deadlines import Deadlines
from .limits import Limiter
from .metrics import Metrics
from .mock_upstream import MockModel
from .policy import Policy, UserPolicy, parse_policy
from .producer import LogPolicy
from .push import PushPolicy
from .routing import Router, parse_routes
from .store import Store, open_store
from .streams import Producers, Streams
from .upstream import UpstreamClient
from .usage import Prices, SqliteUsageBook, UsageBook

# An Idempotency-Key is remembered this long beyond a finished stream's retention, so that it
# outlives the generation it started.
IDEMPOTENCY_MARGIN = 3600.0
RESPONSE_OWNER_TTL = 30 * 86400.0  # as long as OpenAI keeps a stored response

__all__ = ["Services"]


@dataclass
class Services:
    settings: Settings
    keys: ApiKeys
    admin_keys: ApiKeys
    cors: CorsPolicy
    upstream: UpstreamClient | Router  # one upstream, or several (--upstreams)
    store: Store
    streams: Streams
    tickets: ReadTickets
    sessions: Sessions
    response_owners: ResponseOwners
    push_policy: PushPolicy
    deadlines: Deadlines  # heartbeats, stalled writes, silent upstreams: one timer for all
    policy: Policy
    limiter: Limiter
    usage: UsageBook
    prices: Prices
    metrics: Metrics
    caps: RequestCaps
    mock: MockModel | None = None  # the embedded mock model, when no --upstream-url is given
    active_requests: int = 0  # API requests being served now (--max-connections)
    # Event-stream responses under way, once their handlers have handed them over.
    open_streams: set[Any] = field(default_factory=set)
    draining: bool = False  # set at SIGTERM: finish what runs, take nothing new

    @classmethod
    def build(cls, settings: Settings) -> Services:
        mock = None
        metrics = Metrics()
        base_url: str | Callable[[], Awaitable[str]]
        if settings.upstream_url is None and not settings.upstreams:
            # Started on first use, inside the running loop, on a free loopback port.
            mock = MockModel(token_delay=settings.mock_token_delay)
            base_url = mock.start
        else:
            base_url = settings.upstream_url
        upstream: UpstreamClient | Router
        if settings.upstreams:
            upstream = Router(parse_routes(settings.upstreams, connect_timeout=settings.upstream_connect_timeout,
                                           idle_timeout=settings.upstream_idle_timeout), metrics)
        else:
            upstream = UpstreamClient(
                base_url,
                api_key=settings.upstream_api_key,
                connect_timeout=settings.upstream_connect_timeout,
                idle_timeout=settings.upstream_idle_timeout,
            )
        store = open_store(settings.redis_url, retained_bytes=settings.stream_retention_bytes,
                           lease=settings.instance_lease)
        usage: UsageBook
        if settings.redis_url:
            from .usage import RedisUsageBook  # only deployments with Redis need redis-py loaded

            usage = RedisUsageBook(store.client, spill=settings.usage_spill_path)  # type: ignore[attr-defined]
        else:
            usage = SqliteUsageBook(settings.usage_db, spill=settings.usage_spill_path)
        log_policy = LogPolicy(retention=settings.stream_retention, max_events=settings.stream_max_events,
                               max_lifetime=settings.max_stream_lifetime, idle_timeout=settings.upstream_idle_timeout)
        idempotency = IdempotencyKeys(store.keys, ttl=settings.stream_retention + IDEMPOTENCY_MARGIN)
        default = UserPolicy(
            requests_per_minute=settings.requests_per_minute,
            tokens_per_day=settings.tokens_per_day,
            concurrent_streams=settings.concurrent_streams,
            models=frozenset(settings.models) if settings.models else None,
            system_prompt=settings.system_prompt,
        )
        users, model_prompts = parse_policy(settings.policy) if settings.policy else ({}, {})
        policy = Policy(default, users, model_prompts)
        metrics.retained_bytes = lambda: store.logs.retained_bytes
        prices = Prices(settings.prices)
        limiter = Limiter(store.counters, usage, policy, metrics, slot_lease=settings.instance_lease)
        # A heartbeat goes out once a stream has been silent for the interval, within a thirtieth
        # of it after (0.5 s at the default 15 s): the heartbeats due within that time share one
        # wake-up and go out together, which is what ten thousand idle streams cost least with.
        deadlines = Deadlines(resolution=settings.heartbeat_interval / 30)
        producers = Producers(store.logs, store.control, upstream, log_policy, metrics, deadlines,
                              settings.resume_grace)
        streams = Streams(store.logs, store.control, producers, idempotency, limiter, usage, prices,
                          lease=settings.instance_lease)
        return cls(
            settings=settings,
            keys=ApiKeys(settings.api_keys),
            admin_keys=ApiKeys({key: "admin" for key in settings.admin_keys}),
            cors=CorsPolicy(settings.cors_origins),
            upstream=upstream,
            store=store,
            streams=streams,
            tickets=ReadTickets(store.keys, ttl=settings.ticket_ttl),
            sessions=Sessions(store.keys, ttl=settings.session_ttl),
            response_owners=ResponseOwners(store.keys, ttl=RESPONSE_OWNER_TTL),
            push_policy=PushPolicy(retention=settings.events_retention, keep=settings.events_max),
            deadlines=deadlines,
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
        await self.limiter.close()
        for response in list(self.open_streams):  # readers of streams produced elsewhere, say
            response.close()
        self.deadlines.close()
        await self.upstream.close()
        await self.usage.close()  # while the store's connections are still open
        await self.store.close()
        if self.mock is not None:
            await self.mock.close()
