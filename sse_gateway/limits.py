"""Limits per user: requests per minute, tokens per day, streams at once (issue: running it for real).

Counted in the store, so that several instances on one Redis count together. A refusal is a 429
with `Retry-After` and an OpenAI-shaped error naming the limit, and is counted in the metrics.
A stream holds its slot while it generates for someone: the slot frees when it ends, or when its
last reader leaves (a resume within the grace does not take a slot again).

Tokens per day are reserved at admission, so that a burst of parallel requests cannot all pass
before any of them has used anything: a request reserves what it may use (its prompt, estimated,
and its `max_tokens`, or DEFAULT_COMPLETION_RESERVE), and is admitted while the day's total of
used and reserved tokens is under the limit; at its end the reservation is settled to what it
used. The total is one counter per user and day in the store, added to atomically, so that
instances on one Redis share it; it starts from the usage book's figure for the day.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
from typing import Any

from .errors import GatewayError
from .metrics import Metrics
from .policy import Policy
from .store import Counters, StoreUnavailable
from .usage import UsageBook, estimate_tokens, text_of, today

__all__ = ["Limiter", "Reservation", "limited"]

log = logging.getLogger("sse_gateway.limits")

DAY_TOTAL_MAX_AGE = 2 * 24 * 3600.0  # a day's token total is kept past its day, then forgotten
DEFAULT_COMPLETION_RESERVE = 1000  # tokens reserved for an answer whose request sets no max_tokens


def limited(limit: str, message: str, retry_after: float) -> GatewayError:
    return GatewayError(429, message, type="rate_limit_error", code=f"{limit}_exceeded",
                        retry_after=max(1, math.ceil(retry_after)))


def _seconds_to_midnight() -> float:
    now = datetime.datetime.now(datetime.UTC)
    midnight = (now + datetime.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


class Reservation:
    """Tokens of a user's day held for one request, from its admission until `settle()` says
    what it used (0 for a request that never reached the model). Settled once; later calls do
    nothing, so that every path of a request may settle it without counting twice."""

    __slots__ = ("_counters", "key", "amount", "_settled")

    def __init__(self, counters: Counters, key: str, amount: int) -> None:
        self._counters = counters
        self.key = key
        self.amount = amount
        self._settled = False

    async def settle(self, used: int) -> None:
        if self._settled:
            return
        self._settled = True
        if used != self.amount:
            try:
                await self._counters.add(self.key, used - self.amount, DAY_TOTAL_MAX_AGE)
            except StoreUnavailable:
                log.warning("tokens of the day for %s could not be settled (%+d): the store is away",
                            self.key, used - self.amount)


def reserve_for(payload: dict[str, Any]) -> int:
    """What a request may use: its prompt, estimated, and the answer it allows (a chat request's
    `messages` and `max_tokens`, or a Responses request's `input` and `max_output_tokens`)."""
    answer = (payload.get("max_completion_tokens") or payload.get("max_tokens") or payload.get("max_output_tokens")
              or DEFAULT_COMPLETION_RESERVE)
    prompt = payload.get("messages") if "messages" in payload else payload.get("input")
    text = prompt if isinstance(prompt, str) else text_of(prompt if isinstance(prompt, list) else [])
    return estimate_tokens(text) + int(answer)


class Limiter:
    def __init__(self, counters: Counters, usage: UsageBook, policy: Policy, metrics: Metrics,
                 slot_lease: float = 10.0) -> None:
        self.counters = counters
        self.usage = usage
        self.policy = policy
        self.metrics = metrics
        # A stream's slot lapses 2 * slot_lease after its holder last renewed it, which it does
        # every half lease: the slots of an instance that died free up by themselves.
        self.slot_lease = slot_lease
        self._held: dict[str, str] = {}  # stream id -> user, for the slots this process holds
        self._renewing: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()
        self._known: set[str] = set()  # the day's totals this process has used (and so seeded)
        self._known_date = ""

    def _refuse(self, limit: str, message: str, retry_after: float) -> GatewayError:
        self.metrics.rejections.labels(limit).inc()
        return limited(limit, message, retry_after)

    async def admit(self, user: str, payload: dict[str, Any]) -> Reservation | None:
        """Before a request that asks the model for anything: requests per minute, tokens per
        day. Returns the request's reservation of tokens (None without a daily limit), which
        its end must settle."""
        rules = self.policy.for_user(user)
        if rules.requests_per_minute:
            count, left = await self.counters.count_event(f"rpm:{user}", 60)
            if count > rules.requests_per_minute:
                raise self._refuse("requests_per_minute",
                                   f"Rate limit reached: {rules.requests_per_minute} requests per minute.", left)
        if not rules.tokens_per_day:
            return None
        date = today()
        key, amount = f"tokens:{user}:{date}", reserve_for(payload)
        if self._known_date != date:
            self._known_date, self._known = date, set()
        initial = 0
        if key not in self._known:  # a total this process has not used yet starts from the usage book
            initial = await self.usage.tokens_on(user, date)
            self._known.add(key)
        total = await self.counters.add(key, amount, DAY_TOTAL_MAX_AGE, initial=initial)
        if total - amount >= rules.tokens_per_day:
            await self.counters.add(key, -amount, DAY_TOTAL_MAX_AGE)
            raise self._refuse("tokens_per_day", f"Daily limit reached: {rules.tokens_per_day} tokens.",
                               _seconds_to_midnight())
        return Reservation(self.counters, key, amount)

    def release(self, reservation: Reservation | None) -> None:
        """Settle a reservation whose request never reached the model, in the background."""
        if reservation is not None:
            task = asyncio.ensure_future(reservation.settle(0))
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def take_stream(self, user: str, stream_id: str) -> None:
        rules = self.policy.for_user(user)
        if not rules.concurrent_streams:
            return
        if not await self.counters.take_slot(f"streams:{user}", stream_id, rules.concurrent_streams,
                                             2 * self.slot_lease):
            raise self._refuse("concurrent_streams",
                               f"Too many answers at once: {rules.concurrent_streams} streams at most.", 1)
        self._held[stream_id] = user
        if self._renewing is None:
            self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.slot_lease / 2)
            for stream_id, user in list(self._held.items()):
                try:  # held already: taking it again renews it
                    await self.counters.take_slot(f"streams:{user}", stream_id, 1 << 30, 2 * self.slot_lease)
                except StoreUnavailable:
                    break

    async def free_stream(self, user: str, stream_id: str) -> None:
        self._held.pop(stream_id, None)
        if self.policy.for_user(user).concurrent_streams:
            await self.counters.free_slot(f"streams:{user}", stream_id)

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
