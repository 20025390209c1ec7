"""Prometheus metrics of one service process (its own registry: several apps in one process,
as in tests, never share counters). `GET /metrics` serves them in the text format."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "moderation_requests", "HTTP requests by endpoint and status.",
            ["endpoint", "status"], registry=r,
        )  # fmt: skip
        self.images = Counter("moderation_images", "Images received for judging.", registry=r)
        self.decisions = Counter(
            "moderation_decisions", "Decisions made, by action.", ["action"], registry=r
        )
        self.unrecorded = Counter(
            "moderation_unrecorded_decisions",
            "Decisions recorded neither in the database nor in the spool.",
            registry=r,
        )
        self.rejected = Counter(
            "moderation_rejected_images", "Images refused with 429 (queue full).", registry=r
        )
        self.batch_size = Histogram(
            "moderation_batch_size", "Images per engine batch (coalesced requests).",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "moderation_queue_images", "Images waiting for the engine.", registry=r
        )
        self.latency = Histogram(
            "moderation_request_seconds", "Time from request to response, by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.engine_seconds = Histogram(
            "moderation_engine_seconds", "Time of one engine batch (judge, act, log).",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        return generate_latest(self.registry)
