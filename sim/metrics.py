"""``GET /metrics``: a few of TGI's Prometheus metrics, named and typed as TGI exports them.

TGI renders with ``metrics-exporter-prometheus``, which keeps counter names as given (``tgi_request_count``, no
``_total`` suffix) and prints integers without a decimal point. ``prometheus_client`` would rename the counters, so
this small registry renders the text format itself.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol


class EngineView(Protocol):
    """What the metrics read from the engine at scrape time."""

    @property
    def queue_size(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def kv_free_tokens(self) -> int: ...


class SimMetrics:
    """Counters that handlers and the engine bump; gauges read from the engine when scraped."""

    def __init__(self, max_batch_total_tokens: int) -> None:
        self._max_batch_total_tokens = max_batch_total_tokens
        self.request_count = 0
        self.request_success = 0
        self.request_failure: Counter[str] = Counter()
        self.batch_inference: Counter[str] = Counter()
        self.generated_tokens = 0
        self.input_tokens = 0

    def request_received(self) -> None:
        self.request_count += 1

    def success(self, input_tokens: int, generated_tokens: int) -> None:
        self.request_success += 1
        self.input_tokens += input_tokens
        self.generated_tokens += generated_tokens

    def failure(self, err: str) -> None:
        """``err`` as TGI labels it: validation, overloaded, generation, dropped, incomplete."""
        self.request_failure[err] += 1

    def batch_step(self, method: str) -> None:
        self.batch_inference[method] += 1

    def render(self, engine: EngineView) -> str:
        lines: list[str] = []

        def family(name: str, kind: str, samples: list[tuple[str, int | float]]) -> None:
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{labels} {_number(value)}")

        family("tgi_request_count", "counter", [("", self.request_count)])
        family("tgi_request_success", "counter", [("", self.request_success)])
        if self.request_failure:
            family(
                "tgi_request_failure",
                "counter",
                [(f'{{err="{err}"}}', n) for err, n in sorted(self.request_failure.items())],
            )
        if self.batch_inference:
            family(
                "tgi_batch_inference_count",
                "counter",
                [(f'{{method="{m}"}}', n) for m, n in sorted(self.batch_inference.items())],
            )
        family("tgi_queue_size", "gauge", [("", engine.queue_size)])
        family("tgi_batch_current_size", "gauge", [("", engine.batch_size)])
        used = self._max_batch_total_tokens - engine.kv_free_tokens
        family("tgi_batch_current_max_tokens", "gauge", [("", used)])
        return "\n".join(lines) + "\n"


def _number(value: int | float) -> str:
    if isinstance(value, float) and not value.is_integer():
        return repr(value)
    return str(int(value))
