"""The gateway's Prometheus metrics, in one registry that the HTTP facade serves at ``/metrics``.

Names follow the Prometheus conventions (``joulegate_`` prefix, base units, ``_total`` for counters, ``_seconds``
for durations, ``_joules`` for energy). Tenant labels are bounded: past ``MAX_TENANT_LABELS`` distinct tenants,
further ones are counted under ``tenant="other"``. Other modules define their metrics against ``REGISTRY``.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)
MAX_TENANT_LABELS = 100

_tenants: set[str] = set()
_tenants_lock = threading.Lock()


def tenant_label(tenant: str) -> str:
    """``tenant`` itself for the first MAX_TENANT_LABELS tenants seen, "other" after that."""
    if tenant in _tenants:
        return tenant
    with _tenants_lock:
        if len(_tenants) < MAX_TENANT_LABELS:
            _tenants.add(tenant)
            return tenant
    return "other"


class Children:
    """A labelled metric's children by label values, looked up in a dict: ``labels()`` checks and converts its
    arguments and takes a lock on every call, once per request per metric on the request path. Label values are
    bounded (``tenant_label``, configured models and classes, status names), and so is this cache."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "joulegate_requests",
    "Generation requests finished, by model, API, traffic class, tenant and gRPC status code name.",
    ["model", "api", "traffic_class", "tenant", "code"],
    registry=REGISTRY,
)
GENERATED_TOKENS = Counter(
    "joulegate_generated_tokens", "Tokens generated, by model and tenant.", ["model", "tenant"], registry=REGISTRY
)
PROMPT_TOKENS = Counter(
    "joulegate_prompt_tokens", "Prompt tokens processed, by model and tenant.", ["model", "tenant"], registry=REGISTRY
)
TTFT = Histogram(
    "joulegate_time_to_first_token_seconds",
    "From the gateway receiving a request to its first token, queueing included.",
    ["model", "traffic_class"],
    buckets=LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
LATENCY = Histogram(
    "joulegate_request_duration_seconds",
    "From the gateway receiving a request to its last token.",
    ["model", "traffic_class"],
    buckets=LATENCY_BUCKETS_S,
    registry=REGISTRY,
)
BACKEND_IN_FLIGHT = Gauge(
    "joulegate_backend_in_flight_requests", "Requests in flight on each backend.", ["backend"], registry=REGISTRY
)
BACKEND_HEALTHY = Gauge(
    "joulegate_backend_healthy", "1 while the backend answers /health, else 0.", ["backend"], registry=REGISTRY
)
BACKENDS_NEEDED = Gauge(
    "joulegate_backends_needed",
    "Backends the model's load needs packed at [routing] pack_target (peak over scale_in_after_s): the parking signal.",
    ["model"],
    registry=REGISTRY,
)
