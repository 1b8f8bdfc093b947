"""OpenTelemetry traces through a real gateway over loopback (gRPC and HTTP front doors, a simulated TGI backend),
exported to the SDK's in-memory exporter: one front-door span per call continuing the client's W3C traceparent, a
generation span per request id with its queue wait and backend call as children, the attributes that join a trace
to the request's energy rows, and the backend span's traceparent as TGI (the simulator) received it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from app.config import load_config
from app.server import GatewayApp
from common.errors import ConfigError
from meter.store.keys import create_key
from meter.store.migrate import ensure_schema
from proxy.grpc_api import GENERATE_METHOD, GENERATE_STREAM_METHOD
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from proxy.tracing import Tracing
from sim.config import SimConfig
from sim.server import SimTGI
from tests.waiting import wait_until_async

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@contextlib.asynccontextmanager
async def traced_gateway(tmp_path: Path, tracing: dict[str, Any] | None = None, *, exporter: bool = True
                         ) -> AsyncIterator[tuple[GatewayApp, SimTGI, InMemorySpanExporter, str]]:  # fmt: skip
    await asyncio.to_thread(tmp_path.mkdir, parents=True, exist_ok=True)
    sim = SimTGI(SimConfig(time_scale=0.02))
    url = await sim.start()
    config = load_config(
        environ={},
        overrides={
            "db": {"url": f"sqlite:///{tmp_path / 'gateway.db'}"},
            "server": {"grpc_listen": "127.0.0.1:0", "http_listen": "127.0.0.1:0", "drain_grace_s": 1.0},
            "meter": {"journal_path": str(tmp_path / "journal.jsonl"), "source": "none"},
            "backend_pool": {"health_interval_s": 0.2},
            "tracing": tracing or {},
            "models": [
                {
                    "model_id": "sim-model",
                    "backends": [{"url": url, "name": "tgi-0"}],
                    "shaping": {
                        "default_class": "interactive",
                        "classes": {"interactive": {"policy": "passthrough"}, "bulk": {"policy": "batch"}},
                    },
                }
            ],
        },
    )
    spans = InMemorySpanExporter()
    app = GatewayApp(config, span_exporter=spans if exporter else None)
    ensure_schema(app.engine)
    key = create_key(app.engine, "acme").key
    await app.start()
    try:
        yield app, sim, spans, key
    finally:
        await app.stop(1.0)
        await sim.stop()


def by_name(spans: InMemorySpanExporter) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in spans.get_finished_spans():
        out.setdefault(s.name, []).append(s)
    return out


def hex_span(span: ReadableSpan) -> str:
    return format(span.context.span_id, "016x")


async def wait_spans(spans: InMemorySpanExporter, n: int) -> None:
    await wait_until_async(lambda: len(spans.get_finished_spans()) >= n, 10.0, what=f"{n} spans", poll_s=0.02)


def check_request(found: dict[str, list[ReadableSpan]], server: ReadableSpan, request_id: str, sim: SimTGI) -> None:
    """The generation span of ``request_id`` under ``server``, its queue and backend children, and the traceparent
    the backend received: the backend span's."""
    (gen,) = [g for g in found["joulegate.generation"] if g.attributes["joulegate.request_id"] == request_id]
    assert gen.parent is not None and gen.parent.span_id == server.context.span_id
    assert gen.context.trace_id == server.context.trace_id
    attrs = gen.attributes
    assert attrs["joulegate.tenant"] == "acme"
    assert attrs["joulegate.backend"] == "tgi-0"
    assert attrs["joulegate.status"] == "OK"
    assert attrs["gen_ai.request.model"] == "sim-model"
    assert attrs["gen_ai.usage.output_tokens"] > 0 and attrs["gen_ai.usage.input_tokens"] > 0
    children = {
        s.name: s
        for name in ("joulegate.queue", "joulegate.backend")
        for s in found[name]
        if s.parent is not None and s.parent.span_id == gen.context.span_id
    }
    assert set(children) == {"joulegate.queue", "joulegate.backend"}
    queue, backend = children["joulegate.queue"], children["joulegate.backend"]
    assert queue.end_time <= backend.start_time  # released, then sent
    assert backend.kind is SpanKind.CLIENT
    assert [e.name for e in backend.events] == ["first_token"]
    assert [e.name for e in gen.events] == ["timeline_recorded"]
    assert backend.attributes["gen_ai.usage.output_tokens"] == attrs["gen_ai.usage.output_tokens"]
    # what TGI got: the same trace, with the backend span as its parent
    trace_id = format(server.context.trace_id, "032x")
    version, got_trace, parent, flags = sim.traceparents[request_id].split("-")
    assert (version, got_trace, parent) == ("00", trace_id, hex_span(backend))
    assert int(flags, 16) & 1  # sampled


async def test_grpc_spans_continue_the_clients_trace_down_to_the_backend(tmp_path: Path) -> None:
    async with traced_gateway(tmp_path) as (app, sim, spans, key):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pbg.GenerationServiceStub(channel)
            md = (("authorization", f"Bearer {key}"), ("traceparent", TRACEPARENT), ("x-traffic-class", "bulk"))
            call = stub.GenerateStream(
                pb.SingleGenerationRequest(
                    request=pb.GenerationRequest(text="hello " * 20),
                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=8)),
                ),
                metadata=md,
            )
            async for _ in call:
                pass
            stream_id = dict(await call.initial_metadata())["x-request-id"]
            # a batched call of two texts, without a traceparent: a new trace, one generation span per text
            unary = stub.Generate(
                pb.BatchedGenerationRequest(
                    requests=[pb.GenerationRequest(text="one"), pb.GenerationRequest(text="two")],
                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4)),
                ),
                metadata=md[:1],
            )
            await unary
            batch_id = dict(await unary.initial_metadata())["x-request-id"]
        await wait_spans(spans, 2 * 5 + 3)
        found = by_name(spans)

        (server,) = found[GENERATE_STREAM_METHOD]
        assert server.kind is SpanKind.SERVER
        assert format(server.context.trace_id, "032x") == TRACE_ID  # the client's trace goes on
        assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
        assert server.attributes["joulegate.request_id"] == stream_id
        assert server.attributes["joulegate.tenant"] == "acme"
        assert server.status.status_code is not StatusCode.ERROR
        (auth,) = [a for a in found["joulegate.auth"] if a.parent and a.parent.span_id == server.context.span_id]
        assert auth.status.status_code is not StatusCode.ERROR
        check_request(found, server, stream_id, sim)
        (gen,) = [g for g in found["joulegate.generation"] if g.attributes["joulegate.request_id"] == stream_id]
        assert gen.attributes["joulegate.traffic_class"] == "bulk"

        (batch,) = found[GENERATE_METHOD]
        assert batch.parent is None and format(batch.context.trace_id, "032x") != TRACE_ID  # a trace of its own
        for i in range(2):
            check_request(found, batch, f"{batch_id}-{i}", sim)


async def test_http_spans_and_a_refused_call(tmp_path: Path) -> None:
    async with traced_gateway(tmp_path) as (app, sim, spans, key):
        base = f"http://127.0.0.1:{app.http_port}"
        async with aiohttp.ClientSession() as http:
            headers = {"authorization": f"Bearer {key}", "traceparent": TRACEPARENT}
            body = {"inputs": "hello " * 10, "parameters": {"max_new_tokens": 6}}
            async with http.post(f"{base}/generate_stream", json=body, headers=headers) as resp:
                assert resp.status == 200
                await resp.read()
                request_id = resp.headers["x-request-id"]
            await wait_spans(spans, 5)
            found = by_name(spans)
            (server,) = found["POST /generate_stream"]
            assert server.kind is SpanKind.SERVER
            assert format(server.context.trace_id, "032x") == TRACE_ID
            assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
            assert server.attributes["joulegate.request_id"] == request_id
            check_request(found, server, request_id, sim)

            spans.clear()
            async with http.post(f"{base}/generate", json=body, headers={"authorization": "Bearer nope"}) as resp:
                assert resp.status == 401
            await wait_spans(spans, 2)
            refused, auth = by_name(spans)["POST /generate"][0], by_name(spans)["joulegate.auth"][0]
            assert auth.parent is not None and auth.parent.span_id == refused.context.span_id
            assert auth.attributes["joulegate.status"] == "UNAUTHENTICATED"
            assert refused.status.status_code is StatusCode.ERROR
            assert refused.attributes["joulegate.status"] == "UNAUTHENTICATED"


async def test_sampling_follows_the_clients_flag_and_tracing_is_off_by_default(tmp_path: Path) -> None:
    request = pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text="hi")], params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2))
    )
    async with traced_gateway(tmp_path / "a", {"sample_ratio": 0.0}) as (app, sim, spans, key):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pbg.GenerationServiceStub(channel)
            auth = ("authorization", f"Bearer {key}")
            unsampled = stub.Generate(request, metadata=(auth,))
            await unsampled
            dropped = dict(await unsampled.initial_metadata())["x-request-id"]
            await stub.Generate(request, metadata=(auth, ("traceparent", TRACEPARENT)))  # the client sampled it
        await wait_spans(spans, 5)
        assert {format(s.context.trace_id, "032x") for s in spans.get_finished_spans()} == {TRACE_ID}
        # the unsampled trace still reaches the backend, flagged not sampled
        assert not int(sim.traceparents[dropped].rsplit("-", 1)[1], 16) & 1

    assert not load_config(environ={}).tracing.enabled  # off unless an endpoint is configured
    async with traced_gateway(tmp_path / "b", exporter=False) as (app, sim, _, key):
        assert not app.tracing.enabled
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            await pbg.GenerationServiceStub(channel).Generate(request, metadata=(("authorization", f"Bearer {key}"),))
        assert sim.traceparents == {}


def test_an_endpoint_turns_tracing_on_over_otlp() -> None:
    cfg = load_config(environ={"JOULEGATE_TRACING__ENDPOINT": "http://127.0.0.1:4317"})
    tracing = Tracing.from_config(cfg.tracing)
    try:
        assert tracing.enabled
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("name", "value"),
    [("SAMPLE_RATIO", "-0.1"), ("SAMPLE_RATIO", "1.5"), ("ENDPOINT", "otel-collector:4317")],
)
def test_bad_tracing_settings_are_refused(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name.lower()):
        load_config(environ={f"JOULEGATE_TRACING__{name}": value})


async def test_a_stream_its_client_cancels_ends_its_spans_cancelled(tmp_path: Path) -> None:
    async with traced_gateway(tmp_path) as (app, _sim, spans, key):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            call = pbg.GenerationServiceStub(channel).GenerateStream(
                pb.SingleGenerationRequest(
                    request=pb.GenerationRequest(text="long"),
                    params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=1000)),
                ),
                metadata=(("authorization", f"Bearer {key}"),),
            )
            async for message in call:
                if message.generated_token_count >= 2:
                    break
            call.cancel()
            await wait_until_async(lambda: GENERATE_STREAM_METHOD in by_name(spans), 10.0, what="the call's span")
        await wait_spans(spans, 5)
        found = by_name(spans)
        (server,) = found[GENERATE_STREAM_METHOD]
        (gen,) = found["joulegate.generation"]
        (backend,) = found["joulegate.backend"]
        for span in (server, gen, backend):
            assert span.attributes["joulegate.status"] == "CANCELLED", span.name
            assert span.status.status_code is StatusCode.ERROR
        assert 2 <= gen.attributes["gen_ai.usage.output_tokens"] < 1000


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver on loopback: what an OpenTelemetry collector gets."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


async def test_spans_reach_an_otlp_collector_at_the_configured_endpoint(tmp_path: Path) -> None:
    collector = _Collector()
    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        tracing = {"endpoint": f"http://127.0.0.1:{port}", "service_name": "joulegate-test"}
        async with traced_gateway(tmp_path, tracing, exporter=False) as (app, _sim, _spans, key):
            assert app.tracing.enabled
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                unary = pbg.GenerationServiceStub(channel).Generate(
                    pb.BatchedGenerationRequest(
                        requests=[pb.GenerationRequest(text="hi")],
                        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2)),
                    ),
                    metadata=(("authorization", f"Bearer {key}"), ("traceparent", TRACEPARENT)),
                )
                await unary
                request_id = dict(await unary.initial_metadata())["x-request-id"]
        # the gateway's stop flushed its batch
        spans = [
            (resource.resource, span)
            for r in collector.requests
            for resource in r.resource_spans
            for scope in resource.scope_spans
            for span in scope.spans
        ]
        names = {s.name for _, s in spans}
        assert {GENERATE_METHOD, "joulegate.generation", "joulegate.queue", "joulegate.backend"} <= names
        assert all(s.trace_id.hex() == TRACE_ID for _, s in spans)
        services = {a.value.string_value for res, _ in spans for a in res.attributes if a.key == "service.name"}
        assert services == {"joulegate-test"}
        (gen,) = [s for _, s in spans if s.name == "joulegate.generation"]
        assert {a.key: a.value.string_value for a in gen.attributes}["joulegate.request_id"] == request_id
    finally:
        await server.stop(None)
