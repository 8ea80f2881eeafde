"""Prometheus metrics (`GET /metrics`), one registry per application (DESIGN.md §4.4).

Names follow Prometheus conventions (`_total` is added to counters by prometheus_client). With
`--processes=N` each process reports its own numbers: scrape each, or sum them in the query.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
_GAP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("sse_open_connections", "Event-stream connections open now.", registry=r)
        self.streams = Gauge("sse_running_streams", "Streams whose producer runs in this process.", registry=r)
        self.time_to_first_token = Histogram(
            "sse_time_to_first_token_seconds", "From a stream's start to its first content chunk.", buckets=_LATENCY, registry=r
        )
        self.token_gap = Histogram(
            "sse_inter_token_gap_seconds", "Between successive chunks of a stream, from the upstream.", buckets=_GAP, registry=r
        )
        self.frames = Counter("sse_frames_relayed", "Data frames written to clients.", registry=r)
        self.bytes = Counter("sse_bytes_relayed", "Bytes of event streams written to clients.", registry=r)
        self.heartbeats = Counter("sse_heartbeats_sent", "Heartbeat comments written to clients.", registry=r)
        self.upstream_errors = Counter("sse_upstream_errors", "Upstream failures, by kind.", ["kind"], registry=r)
        self.disconnects = Counter(
            "sse_client_disconnects", "Event-stream connections that ended early, by reason.", ["reason"], registry=r
        )
        self.cancellations = Counter("sse_stream_cancellations", "Streams cancelled, by reason.", ["reason"], registry=r)
        self.rejections = Counter("sse_limit_rejections", "Requests refused by a limit, by limit.", ["limit"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
