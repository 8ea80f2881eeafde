"""Several upstreams (`--upstreams=@file`): routing by model, retries and fallback before the
first token, and a circuit breaker per upstream (issue 14).

The routing table is a JSON list of entries:

    {"name": "openai", "url": "https://api.openai.com/v1", "api_key": "env:OPENAI_API_KEY",
     "models": ["gpt-4o", "gpt-4o-*"], "priority": 0, "weight": 1, "rename": null,
     "connect_timeout": 10, "idle_timeout": 300, "first_token_timeout": 300,
     "max_failures": 3, "cooldown": 30}

For a model, the entries whose `models` match it (exact names, or `*` patterns) are tried by
`priority` (0 first, then 1, …) and, among equal priorities, in an order drawn by `weight`
(so that they share the load). An upstream that keeps failing is skipped for a while.

A request moves to the next upstream when the one it tried fails before the answer's first
token: it cannot be reached, its head is a 429 or 5xx (or refuses the gateway's key), it stays
silent past `first_token_timeout`, or its stream fails before any content (an error as its
first event included: the stream is read up to its first content before the gateway commits
to it): at once to the second upstream, after a pause from the third on. The gateway's own response is not held up by this: its head goes out after one
heartbeat interval at most, with heartbeats flowing, while the fallback goes on. Once a token
has come, a failure is the stream's error frame, as with one upstream: two answers are never
spliced. A request the upstream calls invalid (400, 413, 422) is not tried elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fnmatch
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import GatewayError
from .metrics import Metrics
from .upstream import ChatStream, Chunk, UpstreamClient, UpstreamError, timed_out
from .usage import carries_content

log = logging.getLogger("sse_gateway.routing")

# The second upstream is tried at once (it is another server: waiting would only add to the
# user's wait); each later one after a pause, doubled each time, in case the trouble is shared.
BACKOFF_FIRST = 0.05  # seconds before the third attempt
BACKOFF_MOST = 0.5
NOT_RETRIED = frozenset({400, 413, 422})  # the request itself is at fault: the same anywhere

@dataclass(frozen=True)
class Route:
    """One entry of the routing table."""

    name: str
    url: str
    api_key: str | None
    models: tuple[str, ...]
    priority: int = 0
    weight: float = 1.0
    rename: str | None = None
    connect_timeout: float = 10.0
    idle_timeout: float = 300.0
    first_token_timeout: float = 300.0
    max_failures: int = 3
    cooldown: float = 30.0

    def serves(self, model: str) -> bool:
        return any(fnmatch.fnmatchcase(model, pattern) for pattern in self.models)

    def __repr__(self) -> str:  # never the key
        return f"Route({self.name!r}, {self.url!r})"


def _key(value: Any, name: str) -> str | None:
    """`api_key`: the key itself, `@path` (read from a file) or `env:NAME` (from the environment)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"upstream {name!r}: api_key must be a non-empty string")
    if value.startswith("@"):
        try:
            return Path(value[1:]).read_text().strip()
        except OSError as exc:
            raise ValueError(f"upstream {name!r}: cannot read its api_key file: {exc.strerror}") from None
    if value.startswith("env:"):
        found = os.environ.get(value[4:])
        if not found:
            raise ValueError(f"upstream {name!r}: the environment has no {value[4:]}")
        return found
    return value


def _number(entry: dict[str, Any], field: str, default: float, name: str, *, integer: bool = False,
            minimum: float = 0.0) -> Any:
    value = entry.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"upstream {name!r}: {field} must be {kind} >= {minimum:g}")
    return value


def parse_routes(text: str, *, connect_timeout: float = 10.0, idle_timeout: float = 300.0) -> tuple[Route, ...]:
    """The routing table from its JSON; a ValueError that says what is wrong, and where."""
    from .config import parse_upstream_url  # the same checks as --upstream-url

    try:
        entries = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(entries, list) or not entries:
        raise ValueError("a JSON list of at least one upstream is expected")
    routes, names = [], set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"entry {index} is not an object")
        name = entry.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"entry {index}: name must be 1 to 64 letters, digits, '-', '_' or '.'")
        if name in names:
            raise ValueError(f"entry {index}: the name {name!r} is used twice")
        names.add(name)
        unknown = set(entry) - {field.name for field in dataclasses.fields(Route)}
        if unknown:
            raise ValueError(f"upstream {name!r}: unknown field(s) {', '.join(sorted(unknown))}")
        try:
            url = parse_upstream_url(entry.get("url") if isinstance(entry.get("url"), str) else "")
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"upstream {name!r}: url: {exc}") from None
        models = entry.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
            raise ValueError(f"upstream {name!r}: models must be a non-empty list of names or patterns")
        rename = entry.get("rename")
        if rename is not None and (not isinstance(rename, str) or not rename):
            raise ValueError(f"upstream {name!r}: rename must be a model name")
        weight = _number(entry, "weight", 1.0, name)
        if weight <= 0:
            raise ValueError(f"upstream {name!r}: weight must be above 0")
        idle = _number(entry, "idle_timeout", idle_timeout, name)
        routes.append(Route(
            name=name, url=url, api_key=_key(entry.get("api_key"), name), models=tuple(models),
            priority=_number(entry, "priority", 0, name, integer=True), weight=float(weight), rename=rename,
            connect_timeout=_number(entry, "connect_timeout", connect_timeout, name), idle_timeout=idle,
            first_token_timeout=_number(entry, "first_token_timeout", idle, name),
            max_failures=_number(entry, "max_failures", 3, name, integer=True, minimum=1),
            cooldown=_number(entry, "cooldown", 30.0, name),
        ))
    return tuple(routes)


class Breaker:
    """closed -> open after `max_failures` failures in a row -> half-open after `cooldown`
    seconds: one request at a time probes it; a success closes it, a failure opens it again.
    A 429's Retry-After holds it open that long."""

    __slots__ = ("max_failures", "cooldown", "failures", "open_until", "probing")

    def __init__(self, max_failures: int, cooldown: float) -> None:
        self.max_failures = max_failures
        self.cooldown = cooldown
        self.failures = 0
        self.open_until = 0.0  # while failures >= max_failures (or held): closed to requests until then
        self.probing = False

    def state(self, now: float) -> str:
        if self.open_until > now:
            return "open"
        return "half-open" if self.failures >= self.max_failures else "closed"

    def admit(self, now: float) -> bool:
        """Whether a request may go to this upstream now (a half-open one takes one probe)."""
        state = self.state(now)
        if state == "closed":
            return True
        if state == "half-open" and not self.probing:
            self.probing = True
            return True
        return False

    def succeeded(self) -> None:
        self.failures = 0
        self.open_until = 0.0
        self.probing = False

    def failed(self, now: float, retry_after: float = 0.0) -> None:
        self.failures += 1
        self.probing = False
        if self.failures >= self.max_failures:
            self.open_until = max(self.open_until, now + self.cooldown)
        if retry_after:
            self.open_until = max(self.open_until, now + retry_after)


class Upstream:
    """A route, its client (its own connections and key) and its breaker."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.client = UpstreamClient(route.url, api_key=route.api_key, connect_timeout=route.connect_timeout,
                                     idle_timeout=route.idle_timeout)
        self.breaker = Breaker(route.max_failures, route.cooldown)

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {**payload, "model": self.route.rename} if self.route.rename else payload


def _retried(error: GatewayError) -> bool:
    return error.status not in NOT_RETRIED


def _weighted_order(group: list[Upstream]) -> list[Upstream]:
    """An order in which each upstream comes first in proportion to its weight."""
    return sorted(group, key=lambda u: random.random() ** (1.0 / u.route.weight), reverse=True)


class Router:
    """Several upstreams behind the interface of one UpstreamClient (what producers and handlers
    call), each request routed by its model, with fallback before the first token."""

    def __init__(self, routes: tuple[Route, ...], metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.upstreams = [Upstream(route) for route in routes]
        self.metrics = metrics
        self.clock = clock
        metrics.watch_breakers(lambda: [(u.route.name, u.breaker.state(self.clock())) for u in self.upstreams])

    def candidates(self, model: str) -> list[Upstream]:
        """The upstreams for `model`, in the order to try them (breakers not consulted yet)."""
        serving = [u for u in self.upstreams if u.route.serves(model)]
        if not serving:
            raise GatewayError(404, f"The model `{model}` is not served by this gateway.", code="model_not_found",
                               param="model")
        ordered: list[Upstream] = []
        for priority in sorted({u.route.priority for u in serving}):
            ordered += _weighted_order([u for u in serving if u.route.priority == priority])
        return ordered

    async def _attempts(self, model: str, attempt: Callable[[Upstream], Any]) -> Any:
        """Run `attempt` on each upstream for `model` in turn until one succeeds."""
        candidates = self.candidates(model)
        last: GatewayError | None = None
        tried, previous = 0, ""
        for upstream in candidates:
            now = self.clock()
            if not upstream.breaker.admit(now):
                continue
            name = upstream.route.name
            if tried:
                self.metrics.upstream_fallbacks.labels(previous).inc()
            tried += 1
            previous = name
            try:
                if tried > 2:
                    await asyncio.sleep(min(BACKOFF_FIRST * 2 ** (tried - 3), BACKOFF_MOST))
                self.metrics.upstream_requests.labels(name).inc()
                began = self.clock()
                result = await attempt(upstream)
            except UpstreamError as error:
                if not _retried(error):  # the request's fault, not the upstream's
                    upstream.breaker.probing = False
                    raise
                upstream.breaker.failed(self.clock(), (error.retry_after or 0) if error.status == 429 else 0)
                self.metrics.upstream_failures.labels(name, error.code or "upstream_error").inc()
                log.warning("upstream %s failed before the first token: %s %s", name, error.status, error.code)
                last = error
                continue
            except BaseException:
                upstream.breaker.probing = False  # cancelled (a stop): no verdict on the upstream
                raise
            upstream.breaker.succeeded()
            self.metrics.upstream_first_token.labels(name).observe(self.clock() - began)
            return result
        if last is not None:
            raise last
        soonest = min(u.breaker.open_until for u in candidates) - self.clock()
        raise GatewayError(503, f"Every upstream serving `{model}` is failing; try again shortly.", type="server_error",
                           code="upstreams_unavailable", retry_after=max(1, int(soonest + 0.999)))

    async def open_stream(self, path: str, payload: dict[str, Any], kind: type[ChatStream],
                          carries_content: Callable[[bytes, dict[str, Any] | None], bool] | None = None) -> ChatStream:
        """A streaming answer from the first upstream that gives one, read up to its first
        content (held for the caller) before it is chosen."""

        async def attempt(upstream: Upstream) -> ChatStream:
            body = await upstream.client.open_stream(path, upstream.request(payload), kind)
            try:
                await _first_content(body, carries_content, upstream.route.first_token_timeout)
            except BaseException:
                body.close()
                raise
            body.served_by = upstream.route.name
            return body

        return await self._attempts(str(payload.get("model")), attempt)

    async def open_chat_stream(self, payload: dict[str, Any]) -> ChatStream:
        return await self.open_stream("/chat/completions", payload, ChatStream, carries_content)

    async def chat(self, payload: dict[str, Any]) -> bytes:
        return await self._attempts(str(payload.get("model")),
                                    lambda upstream: upstream.client.chat(upstream.request(payload)))

    async def call(self, method: str, path: str, payload: dict[str, Any] | None = None) -> bytes:
        """A request with a model goes where that model is served; one without (an answer by
        its id) to each upstream in turn until one has it."""
        if payload is not None and isinstance(payload.get("model"), str):
            return await self._attempts(payload["model"],
                                        lambda upstream: upstream.client.call(method, path, upstream.request(payload)))
        error: GatewayError | None = None
        for upstream in self.upstreams:
            try:
                return await upstream.client.call(method, path, payload)
            except UpstreamError as exc:
                error = exc if error is None or exc.status != 404 else error
        assert error is not None
        raise error

    async def models(self) -> bytes:
        """The union of what the upstreams serve: exact names from the table, and what each
        upstream lists that its patterns take in."""

        async def listed(upstream: Upstream) -> list[str]:
            if upstream.route.rename or all("*" not in m and "?" not in m for m in upstream.route.models):
                return []
            try:
                data = orjson.loads(await upstream.client.models()).get("data") or []
            except (GatewayError, ValueError, AttributeError):
                return []
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str) and upstream.route.serves(m["id"])]

        found = await asyncio.gather(*(listed(u) for u in self.upstreams))
        owners: dict[str, str] = {}
        for upstream, ids in zip(self.upstreams, found, strict=True):
            exact = [m for m in upstream.route.models if "*" not in m and "?" not in m]
            for model in exact + ids:
                owners.setdefault(model, upstream.route.name)
        data = [{"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in sorted(owners.items())]
        return orjson.dumps({"object": "list", "data": data})

    async def close(self) -> None:
        await asyncio.gather(*(u.client.close() for u in self.upstreams))


async def _first_content(body: ChatStream, carries_content: Callable[[bytes, dict[str, Any] | None], bool] | None,
                         timeout: float) -> None:
    """Read `body` until its first content (or its end), within `timeout`; what was read is held
    for the caller's first read. A failure before any content is raised: nothing of this answer
    has been shown, so another upstream may give it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    held: list[Chunk] = []
    arrived = asyncio.Event()
    body.listen(arrived.set)
    try:
        while True:
            arrived.clear()
            chunks = body.read()
            held += chunks
            if carries_content is None or any(carries_content(payload, obj) for payload, obj in chunks):
                break
            if body.ended:
                failure = body.failure or body.refusal()
                if failure is not None:
                    raise failure
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise timed_out()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                raise timed_out() from None
    finally:
        body.listen(None)
    body.hold(held)
