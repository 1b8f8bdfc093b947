"""OpenTelemetry traces of the request path: off unless ``[tracing] endpoint`` is set (``common.config``).

The spans of one call::

    fmaas.GenerationService/Generate   (or "POST /generate", ...: the front door, kind SERVER; the client's W3C
      │                                  traceparent is its parent)
      ├─ joulegate.auth                the API key's look-up and scope check
      └─ joulegate.generation          one per request id (a batched call has one per text): tenant, request id,
           │                           model, traffic class, backend, prompt and generated tokens, status
           ├─ joulegate.queue          the wait in the shaping queue (and the rate limit) until a backend slot
           └─ joulegate.backend        the backend call, from sending it to the end of its stream (kind CLIENT; an
                                       event at the first token); its traceparent goes to TGI, which continues it

The generation span ends when the request's timeline is handed to the ledger (event ``timeline_recorded``).

Energy is not on the spans: it is final only seconds after the request ended (``meter.engine.finality``), long after
its spans were exported. ``joulegate.request_id`` is the join: the same id keys the request's energy rows
(``GetRequestEnergy``, ``joulegate report requests``, the CloudEvents export's event id).

Every function here takes and returns ``None`` when tracing is off (and for spans a sampler dropped, the SDK's own
non-recording spans), so the request path pays one attribute look-up then. The OpenTelemetry SDK is imported only
when tracing is on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from common.config import TracingConfig
    from proxy.job import Job

TRACE_HEADERS = ("traceparent", "tracestate")
EXPORT_TIMEOUT_S = 5  # OTLP export, then spans are dropped (and logged by the SDK)


class RequestTrace:
    """The spans of one request id: its generation span, and its backend span while the backend call runs."""

    __slots__ = ("backend", "generation", "tracer")

    def __init__(self, tracer: Tracer, generation: Span) -> None:
        self.tracer = tracer
        self.generation = generation
        self.backend: Span | None = None


class Tracing:
    """The gateway's tracer (``Tracing.off()`` when tracing is off)."""

    def __init__(self, tracer: Tracer | None = None, provider: TracerProvider | None = None) -> None:
        self.tracer = tracer
        self._provider = provider

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @classmethod
    def from_config(cls, cfg: TracingConfig, exporter: SpanExporter | None = None) -> Tracing:
        """Spans to ``cfg.endpoint`` over OTLP/gRPC (batched), or to ``exporter`` (each span as it ends: tests);
        off when neither is given."""
        if exporter is None and not cfg.enabled:
            return cls.off()
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            # a collector that does not answer holds each export (and the gateway's stop) for at most EXPORT_TIMEOUT_S
            exporter = OTLPSpanExporter(endpoint=cfg.endpoint, timeout=EXPORT_TIMEOUT_S)
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider.get_tracer("joulegate"), provider)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    def shutdown(self) -> None:
        """Export what is left (the gateway's stop calls it)."""
        if self._provider is not None:
            self._provider.shutdown()

    # -- the front doors -------------------------------------------------------------------------------------------

    def auth(self, call_span: Span | None) -> contextlib.AbstractContextManager[None]:
        """Around the authentication of a call (``joulegate.auth``, under its front-door span)."""
        return phase(self.tracer, call_span, "joulegate.auth")

    def server_span(self, name: str, carrier: Iterable[tuple[str, Any]] | Mapping[str, Any]) -> Span | None:
        """The span of one call at a front door, continuing the trace of the client's ``traceparent`` (gRPC
        metadata pairs or HTTP headers)."""
        if self.tracer is None:
            return None
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        items = carrier.items() if isinstance(carrier, Mapping) else carrier
        found = {k.lower(): v for k, v in items if isinstance(k, str) and k.lower() in TRACE_HEADERS}
        parent = TraceContextTextMapPropagator().extract({k: v for k, v in found.items() if isinstance(v, str)})
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER)

    # -- the gateway -----------------------------------------------------------------------------------------------

    def request(self, job: Job) -> RequestTrace | None:
        """The generation span of ``job``, under its front door's span."""
        if self.tracer is None:
            return None
        from opentelemetry import trace

        parent = trace.set_span_in_context(job.trace) if job.trace is not None else None
        span = self.tracer.start_span(
            "joulegate.generation",
            context=parent,
            attributes={
                "joulegate.request_id": job.request_id,
                "joulegate.tenant": job.tenant,
                "joulegate.traffic_class": job.traffic_class,
                "joulegate.api": job.api.value,
                "gen_ai.request.model": job.model_id,
                "gen_ai.request.max_tokens": job.max_new_tokens,
            },
        )
        return RequestTrace(self.tracer, span)


def set_call(
    span: Span | None, *, request_id: str, tenant: str | None = None, traffic_class: str | None = None
) -> None:
    """The call's ids on its front-door span."""
    if span is None:
        return
    span.set_attribute("joulegate.request_id", request_id)
    if tenant is not None:
        span.set_attribute("joulegate.tenant", tenant)
    if traffic_class is not None:
        span.set_attribute("joulegate.traffic_class", traffic_class)


def end(
    span: Span | None,
    *,
    status: str | None = None,
    error: BaseException | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> None:
    """End ``span`` with the gRPC status name its client saw (anything but OK marks it an error)."""
    if span is None:
        return
    from opentelemetry.trace import Status, StatusCode

    for k, v in (attrs or {}).items():
        if v is not None:
            span.set_attribute(k, v)
    if status is not None:
        span.set_attribute("joulegate.status", status)
    if error is not None:
        span.record_exception(error)
    if (status is not None and status != "OK") or error is not None:
        span.set_status(Status(StatusCode.ERROR, status or type(error).__name__))
    span.end()


@contextlib.contextmanager
def phase(tracer: Tracer | None, parent: Span | None, name: str) -> Iterator[None]:
    """A child span of ``parent`` around a step; an exception ends it with the gRPC code it maps to."""
    if tracer is None or parent is None:
        yield
        return
    from opentelemetry import trace as otel

    span = tracer.start_span(name, context=otel.set_span_in_context(parent))
    try:
        yield
    except BaseException as exc:
        end(span, status=getattr(getattr(exc, "grpc_code", None), "name", None) or "CANCELLED", error=exc)
        raise
    end(span)


def queued(trace: RequestTrace | None) -> contextlib.AbstractContextManager[None]:
    """Around the wait for a backend slot (shaping queue, rate limit)."""
    if trace is None:
        return contextlib.nullcontext()
    return phase(trace.tracer, trace.generation, "joulegate.queue")


def backend_call(trace: RequestTrace | None) -> dict[str, str]:
    """Start the backend span; the headers that carry it to TGI (``traceparent``, ``tracestate``)."""
    if trace is None:
        return {}
    from opentelemetry import trace as otel
    from opentelemetry.trace import SpanKind
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if trace.backend is None:
        trace.backend = trace.tracer.start_span(
            "joulegate.backend", context=otel.set_span_in_context(trace.generation), kind=SpanKind.CLIENT
        )
    headers: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(headers, context=otel.set_span_in_context(trace.backend))
    return headers


def stream_ended(
    trace: RequestTrace | None, status: str, backend: str | None, first_token_ns: int | None, generated_tokens: int
) -> None:
    """The backend's stream is over: end the backend span."""
    if trace is None or trace.backend is None:
        return
    if first_token_ns is not None:
        trace.backend.add_event("first_token", timestamp=first_token_ns)
    end(
        trace.backend,
        status=status,
        attrs={"joulegate.backend": backend, "gen_ai.usage.output_tokens": generated_tokens},
    )
    trace.backend = None


def recorded(
    trace: RequestTrace | None, status: str, backend: str | None, prompt_tokens: int, generated_tokens: int
) -> None:
    """The request's timeline went to the ledger: end its generation span with what it recorded."""
    if trace is None:
        return
    if trace.backend is not None:  # never opened a stream (refused while opening): close it too
        end(trace.backend, status=status)
        trace.backend = None
    trace.generation.add_event("timeline_recorded")  # handed to the ledger; its energy is final only later
    end(
        trace.generation,
        status=status,
        attrs={
            "joulegate.backend": backend,
            "gen_ai.usage.input_tokens": prompt_tokens,
            "gen_ai.usage.output_tokens": generated_tokens,
        },
    )
