"""Limits per user: requests per minute, tokens per day, streams at once (issue: running it for real).

Counted in the store, so that several instances on one Redis count together. A refusal is a 429
with `Retry-After` and an OpenAI-shaped error naming the limit, and is counted in the metrics.
A stream holds its slot while it generates for someone: the slot frees when it ends, or when its
last reader leaves (a resume within the grace does not take a slot again).
"""

from __future__ import annotations

import datetime
import math

from .errors import GatewayError
from .metrics import Metrics
from .policy import Policy
from .store import Counters
from .usage import UsageBook, today

__all__ = ["Limiter", "limited"]

SLOT_MAX_AGE = 24 * 3600.0  # a slot its holder never freed (a crash) is freed after this long


def limited(limit: str, message: str, retry_after: float) -> GatewayError:
    return GatewayError(429, message, type="rate_limit_error", code=f"{limit}_exceeded",
                        retry_after=max(1, math.ceil(retry_after)))


def _seconds_to_midnight() -> float:
    now = datetime.datetime.now(datetime.UTC)
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


class Limiter:
    def __init__(self, counters: Counters, usage: UsageBook, policy: Policy, metrics: Metrics) -> None:
        self.counters = counters
        self.usage = usage
        self.policy = policy
        self.metrics = metrics

    def _refuse(self, limit: str, message: str, retry_after: float) -> GatewayError:
        self.metrics.rejections.labels(limit).inc()
        return limited(limit, message, retry_after)

    async def admit(self, user: str) -> None:
        """Before a request that asks the model for anything: requests per minute, tokens per day."""
        rules = self.policy.for_user(user)
        if rules.requests_per_minute:
            count, left = await self.counters.count_event(f"rpm:{user}", 60)
            if count > rules.requests_per_minute:
                raise self._refuse("requests_per_minute",
                                   f"Rate limit reached: {rules.requests_per_minute} requests per minute.", left)
        if rules.tokens_per_day and await self.usage.tokens_on(user, today()) >= rules.tokens_per_day:
            raise self._refuse("tokens_per_day", f"Daily limit reached: {rules.tokens_per_day} tokens.",
                               _seconds_to_midnight())

    async def take_stream(self, user: str, stream_id: str) -> None:
        rules = self.policy.for_user(user)
        if rules.concurrent_streams and not await self.counters.take_slot(
            f"streams:{user}", stream_id, rules.concurrent_streams, SLOT_MAX_AGE
        ):
            raise self._refuse("concurrent_streams",
                               f"Too many answers at once: {rules.concurrent_streams} streams at most.", 1)

    async def free_stream(self, user: str, stream_id: str) -> None:
        if self.policy.for_user(user).concurrent_streams:
            await self.counters.free_slot(f"streams:{user}", stream_id)
