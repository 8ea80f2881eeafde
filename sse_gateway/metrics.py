"""Prometheus metrics (`GET /metrics`), one registry per application (DESIGN.md §4.4, §6).

What moves with every frame (frames, bytes, heartbeats, the token-gap histogram) is kept in
plain numbers on this object and turned into Prometheus samples only when `/metrics` is read:
a `prometheus_client` counter takes a lock and several calls per update, which the data path
must not pay per frame. Rare events (errors, disconnects, rejections) keep prometheus_client's
labelled counters. Names follow Prometheus conventions (`_total` is added to counters). With
`--processes=N` each process reports its own numbers: scrape each, or sum them in the query.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client import Histogram as LabelledHistogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

__all__ = ["Metrics", "Histogram", "CONTENT_TYPE_LATEST"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_GAP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15)


class Histogram:
    """Counts per bucket and a sum, updated with one bisect: no lock, no labels."""

    __slots__ = ("name", "documentation", "bounds", "counts", "sum")

    def __init__(self, name: str, documentation: str, bounds: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def family(self) -> HistogramMetricFamily:
        cumulative, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            cumulative.append((bound, total))
        return HistogramMetricFamily(self.name, self.documentation, buckets=cumulative, sum_value=self.sum)


class _HotNumbers(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        yield GaugeMetricFamily("sse_open_connections", "Event-stream connections open now.", value=m.connections)
        yield GaugeMetricFamily("sse_running_streams", "Streams whose producer runs in this process.", value=m.streams)
        yield GaugeMetricFamily("sse_retained_bytes", "Bytes of finished streams kept in memory for resume.",
                                value=m.retained_bytes())
        yield CounterMetricFamily("sse_frames_relayed", "Data frames written to clients.", value=m.frames)
        yield CounterMetricFamily("sse_bytes_relayed", "Bytes of event streams written to clients.", value=m.bytes)
        yield CounterMetricFamily("sse_heartbeats_sent", "Heartbeat comments written to clients.", value=m.heartbeats)
        yield m.time_to_first_token.family()
        yield m.token_gap.family()


class _Breakers(Collector):
    STATES = ("closed", "half-open", "open")

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("sse_upstream_breaker", "1 for the state each upstream's circuit breaker is in.",
                                   labels=["upstream", "state"])
        for name, current in self._metrics._breakers():
            for state in self.STATES:
                family.add_metric([name, state], 1.0 if state == current else 0.0)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Updated on the data path: plain numbers (see the module docstring).
        self.connections = 0
        self.streams = 0
        self.frames = 0
        self.bytes = 0
        self.heartbeats = 0
        self.retained_bytes: Callable[[], int] = lambda: 0  # set to the store's figure
        self.time_to_first_token = Histogram(
            "sse_time_to_first_token_seconds", "From a stream's start to its first content chunk.", _LATENCY
        )
        self.token_gap = Histogram(
            "sse_inter_token_gap_seconds", "Between successive chunks of a stream, from the upstream.", _GAP
        )
        r.register(_HotNumbers(self))
        self.upstream_errors = Counter("sse_upstream_errors", "Upstream failures, by kind.", ["kind"], registry=r)
        self.disconnects = Counter(
            "sse_client_disconnects", "Event-stream connections that ended early, by reason.", ["reason"], registry=r
        )
        self.cancellations = Counter("sse_stream_cancellations", "Streams cancelled, by reason.", ["reason"], registry=r)
        self.rejections = Counter("sse_limit_rejections", "Requests refused by a limit, by limit.", ["limit"], registry=r)
        # Several upstreams (--upstreams): per upstream, by its name in the routing table.
        self.upstream_requests = Counter("sse_upstream_requests", "Requests sent to an upstream.", ["upstream"], registry=r)
        self.upstream_failures = Counter("sse_upstream_failures", "Upstream failures before the first token, by kind.",
                                         ["upstream", "kind"], registry=r)
        self.upstream_fallbacks = Counter("sse_upstream_fallbacks", "Requests moved on from an upstream that failed them.",
                                          ["upstream"], registry=r)
        self.upstream_first_token = LabelledHistogram(
            "sse_upstream_first_token_seconds", "From a request to an upstream to its first content (or its answer).",
            ["upstream"], buckets=_LATENCY, registry=r)
        self._breakers: Callable[[], list[tuple[str, str]]] = list
        r.register(_Breakers(self))

    def watch_breakers(self, states: Callable[[], list[tuple[str, str]]]) -> None:
        """Report each upstream's circuit breaker: `states()` gives (name, state) pairs."""
        self._breakers = states

    def render(self) -> bytes:
        return generate_latest(self.registry)
