"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the app

PREFIX = "qwen_tts"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
_RTF_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.time_to_first_chunk = Histogram(
            f"{PREFIX}_time_to_first_chunk_seconds", "Request received to first audio chunk ready (includes queueing)",
            ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.real_time_factor = Histogram(
            f"{PREFIX}_real_time_factor", "Per stream: generation wall time / audio duration (lower is faster)",
            ["endpoint"], buckets=_RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter(f"{PREFIX}_audio_seconds", "Seconds of audio produced", registry=r)
        self.active_streams = Gauge(f"{PREFIX}_active_streams", "Streams being generated", registry=r)
        self.queue_depth = Gauge(f"{PREFIX}_queue_depth", "Streams admitted and waiting for a slot", registry=r)
        self.frames_total = Counter(f"{PREFIX}_frames", "Codec frames generated (80 ms each)", registry=r)
        self.frames_per_second = Gauge(f"{PREFIX}_frames_per_second",
                                       "Frames generated per second, all streams, over the last 5 s", registry=r)
        self.streams_total = Counter(f"{PREFIX}_streams", "Finished streams by stop reason",
                                     ["endpoint", "stop_reason"], registry=r)
        self.requests_total = Counter(f"{PREFIX}_requests", "Requests by endpoint", ["endpoint"], registry=r)
        self.errors_total = Counter(f"{PREFIX}_errors", "Errors by kind (bad_request, unauthorized, queue_full, "
                                    "internal, ws_protocol, forbidden, too_large, timeout)", ["kind"],
                                    registry=r)

    def observe_first_chunk(self, endpoint: str, seconds: float) -> None:
        self.time_to_first_chunk.labels(endpoint=endpoint).observe(seconds)

    def observe_done(self, job, info, compute_s: float) -> None:
        self.streams_total.labels(endpoint=job.endpoint, stop_reason=info.stop_reason).inc()
        if info.audio_seconds > 0:
            self.audio_seconds.inc(info.audio_seconds)
            self.real_time_factor.labels(endpoint=job.endpoint).observe(compute_s / info.audio_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
