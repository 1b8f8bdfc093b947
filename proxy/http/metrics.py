"""HTTP-specific metrics, next to the gateway's own in ``proxy.metrics.REGISTRY`` (served at ``/metrics``).

Per route template (never the raw path, so unknown paths cannot grow the label set), method (a fixed set, the rest
``other``: aiohttp's pure-Python parser accepts any token as a method) and status code. Generation outcomes by
tenant and model are the gateway's ``joulegate_requests_total``, shared with gRPC.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from proxy.metrics import LATENCY_BUCKETS_S, REGISTRY

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def method_label(method: str) -> str:
    return method if method in METHODS else "other"


HTTP_REQUESTS = Counter(
    "joulegate_http_requests",
    "HTTP requests answered, by route template, method and status code.",
    ["route", "method", "code"],
    registry=REGISTRY,
)
HTTP_DURATION = Histogram(
    "joulegate_http_request_duration_seconds",
    "From an HTTP request's arrival to the end of its answer (the last event of a stream).",
    ["route"],
    buckets=LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
