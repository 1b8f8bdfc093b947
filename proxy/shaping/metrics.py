"""Prometheus metrics of the shaping queue, in the gateway's registry (served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from proxy.metrics import LATENCY_BUCKETS_S, REGISTRY

RELEASE_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

QUEUED_REQUESTS = Gauge(
    "joulegate_shaping_queued_requests",
    "Requests waiting in the shaping queue (held or released but not yet placed), by model and traffic class.",
    ["model", "traffic_class"],
    registry=REGISTRY,
)
QUEUED_TOKENS = Gauge(
    "joulegate_shaping_queued_tokens",
    "Token estimate (prompt + max new tokens) of the requests waiting in the shaping queue.",
    ["model", "traffic_class"],
    registry=REGISTRY,
)
HOLD = Histogram(
    "joulegate_shaping_hold_seconds",
    "Time a request spent in the shaping queue before it got a backend slot.",
    ["model", "traffic_class"],
    buckets=(0.0, *LATENCY_BUCKETS_S),
    registry=REGISTRY,
)
RELEASE_SIZE = Histogram(
    "joulegate_shaping_release_size_requests",
    "Requests released together by one decision of the class's policy.",
    ["model", "traffic_class"],
    buckets=RELEASE_SIZE_BUCKETS,
    registry=REGISTRY,
)
PLACED_BATCH = Histogram(
    "joulegate_shaping_placed_batch_requests",
    "Requests placed on one backend at the same instant (what TGI can prefill together).",
    ["model", "traffic_class"],
    buckets=RELEASE_SIZE_BUCKETS,
    registry=REGISTRY,
)
REJECTED = Counter(
    "joulegate_shaping_rejected",
    "Requests refused admission to the shaping queue (RESOURCE_EXHAUSTED), by the limit that was hit.",
    ["model", "traffic_class", "tenant", "limit"],
    registry=REGISTRY,
)
EXPIRED = Counter(
    "joulegate_shaping_expired",
    "Requests whose deadline passed while they waited in the shaping queue (they never reached a backend).",
    ["model", "traffic_class"],
    registry=REGISTRY,
)
CANCELLED = Counter(
    "joulegate_shaping_cancelled",
    "Requests whose client went away while they waited in the shaping queue.",
    ["model", "traffic_class"],
    registry=REGISTRY,
)
HOLD_TARGET = Gauge(
    "joulegate_shaping_hold_target_seconds",
    "The longest the class's policy would hold a request now (adaptive: the hold it chose from the arrival rate).",
    ["model", "traffic_class"],
    registry=REGISTRY,
)
