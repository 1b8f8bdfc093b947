"""joulegate.v1.EnergyReports through the gateway's gRPC port: tenant isolation, statuses, wait_final, reflection.

The ledger is built by hand in the gateway's own database (the rows the attribution engine would write), so every
figure checked here is known exactly; meter.reports' own tests hold the arithmetic on both databases.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from meter.pb.joulegate.v1 import energy_pb2 as pb
from meter.pb.joulegate.v1 import energy_pb2_grpc as pb_grpc

from ..test_reports import E1, LAG, TIME_IDLE, H, scenario
from ..test_reports_oracle import MS, Req, S, insert, seal
from .harness import Stack, running_stack


def md(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    overrides = {
        "meter": {"idle_policy": "time", "lag_ms": LAG // MS},
        "carbon": {"grid_g_co2e_per_kwh": 500.0, "pue": 1.5},
    }
    async with running_stack(tmp_path, overrides=overrides) as s:
        insert(s.app.engine, *scenario())
        seal(s.app.engine, "ABC")
        yield s


async def code_of(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call  # type: ignore[misc]
    return err.value.code()


async def test_a_tenant_key_reads_only_its_own_tenant(stack: Stack) -> None:
    reports = pb_grpc.EnergyReportsStub(stack.channel)
    tenant = md(stack.key)  # tenant-a: owns A and C; B and D are tenant-b's

    a = await reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id="A"), metadata=tenant)
    assert (a.tenant, a.model_id, a.backend, a.status, a.final) == ("tenant-a", "m1", "b1", "OK", True)
    assert (a.prompt_tokens, a.generated_tokens, a.idle_policy) == (10, 30, pb.IDLE_POLICY_TIME)
    assert (a.prefill_j, a.decode_j) == (0.3, 1.7)
    assert a.idle_j == pytest.approx(TIME_IDLE["A"] / 1000) and a.total_j == pytest.approx(2.0 + TIME_IDLE["A"] / 1000)
    assert a.received.ToNanoseconds() == H - 700 * MS and a.done.ToNanoseconds() == H + 400 * MS
    assert a.queued_ms == 100.0

    denied = reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id="B"), metadata=tenant)
    assert await code_of(denied) == grpc.StatusCode.PERMISSION_DENIED
    missing = reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id="nope"), metadata=tenant)
    assert await code_of(missing) == grpc.StatusCode.NOT_FOUND

    listed = await reports.ListRequests(pb.ListRequestsRequest(), metadata=tenant)
    assert [r.request_id for r in listed.requests] == ["C", "A"] and listed.next_page_token == ""
    other = reports.ListRequests(pb.ListRequestsRequest(tenant="tenant-b"), metadata=tenant)
    assert await code_of(other) == grpc.StatusCode.PERMISSION_DENIED
    own = await reports.ListRequests(pb.ListRequestsRequest(tenant="tenant-a", model_id="m2"), metadata=tenant)
    assert [r.request_id for r in own.requests] == ["C"]

    usage = await reports.GetUsage(pb.GetUsageRequest(group_by=pb.GetUsageRequest.MODEL), metadata=tenant)
    assert [(r.key, r.requests) for r in usage.rows] == [("m1", 1), ("m2", 1)]
    assert usage.total.requests == 2 and usage.total.generated_tokens == 50
    other = reports.GetUsage(pb.GetUsageRequest(tenant="tenant-b"), metadata=tenant)
    assert await code_of(other) == grpc.StatusCode.PERMISSION_DENIED

    backends = reports.GetBackendEnergy(pb.GetBackendEnergyRequest(), metadata=tenant)
    assert await code_of(backends) == grpc.StatusCode.PERMISSION_DENIED
    anonymous = reports.GetUsage(pb.GetUsageRequest())
    assert await code_of(anonymous) == grpc.StatusCode.UNAUTHENTICATED


async def test_an_admin_key_reads_everything(stack: Stack) -> None:
    reports = pb_grpc.EnergyReportsStub(stack.channel)
    admin = md(stack.admin_key)
    b = await reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id="B"), metadata=admin)
    assert b.tenant == "tenant-b" and b.prefill_j == 0.5
    d = await reports.GetRequestEnergy(pb.GetRequestEnergyRequest(request_id="D"), metadata=admin)
    assert d.final and d.backend == "" and not d.HasField("released") and d.total_j == 0

    listed = await reports.ListRequests(pb.ListRequestsRequest(page_size=3), metadata=admin)
    assert [r.request_id for r in listed.requests] == ["D", "C", "B"] and listed.next_page_token
    rest = await reports.ListRequests(pb.ListRequestsRequest(page_token=listed.next_page_token), metadata=admin)
    assert [r.request_id for r in rest.requests] == ["A"] and rest.next_page_token == ""
    only_b = await reports.ListRequests(pb.ListRequestsRequest(tenant="tenant-b", status="OK"), metadata=admin)
    assert [r.request_id for r in only_b.requests] == ["B"]

    start = pb.GetUsageRequest(group_by=pb.GetUsageRequest.HOUR)
    start.start.FromNanoseconds(H - 3600 * S)
    usage = await reports.GetUsage(start, metadata=admin)
    assert [r.key for r in usage.rows] == ["2023-11-13T23:00:00Z", "2023-11-14T00:00:00Z", "2023-11-14T01:00:00Z"]
    assert (usage.grid_g_co2e_per_kwh, usage.pue, usage.idle_policy) == (500.0, 1.5, pb.IDLE_POLICY_TIME)
    assert usage.start.ToNanoseconds() == H - 3600 * S and usage.end.ToNanoseconds() <= time.time_ns()
    total_j = 3.4 + 0.6  # prefill + decode of A, B, C, and E0 + E1 idle shared by time
    assert usage.total.total_j == pytest.approx(total_j) and usage.total.idle_share == pytest.approx(0.6 / total_j)
    assert usage.total.co2e_g == pytest.approx(total_j * 1.5 * 500 / 3.6e6)
    assert usage.total.j_per_generated_token == pytest.approx(total_j / 60)
    assert usage.total.total_wh == pytest.approx(total_j / 3600)

    backends = await reports.GetBackendEnergy(pb.GetBackendEnergyRequest(), metadata=admin)
    (b1,) = backends.backends
    assert (b1.backend, b1.counter_j, b1.attributed_j, b1.idle_j, b1.conservation_error_mj) == ("b1", 5, 3.4, 1.6, 0)
    assert (b1.prefill_j, b1.decode_j, b1.requests, b1.samples, b1.gaps) == (1.0, 2.4, 3, 30, 0)
    assert b1.attributed_until.ToNanoseconds() == H + 2 * S


@pytest.mark.parametrize(
    ("method", "message", "field"),
    [
        ("GetUsage", pb.GetUsageRequest(group_by=9), "group_by"),
        ("GetUsage", pb.GetUsageRequest(start={"seconds": -1}), "start"),
        ("GetUsage", pb.GetUsageRequest(end={"seconds": 10, "nanos": -5}), "end"),
        ("GetUsage", pb.GetUsageRequest(start={"seconds": 20}, end={"seconds": 10}), "end"),
        ("GetBackendEnergy", pb.GetBackendEnergyRequest(end={"seconds": 10**12}), "end"),
        ("ListRequests", pb.ListRequestsRequest(page_size=1001), "page_size"),
        ("ListRequests", pb.ListRequestsRequest(page_token="not-a-token"), "page_token"),
        ("ListRequests", pb.ListRequestsRequest(start={"seconds": 5}, end={"seconds": 5}), "end"),
        ("GetRequestEnergy", pb.GetRequestEnergyRequest(), "request_id"),
        ("GetRequestEnergy", pb.GetRequestEnergyRequest(request_id="A", wait_timeout_ms=600_001), "wait_timeout_ms"),
    ],
)
async def test_malformed_queries_are_invalid_argument_naming_the_field(
    stack: Stack, method: str, message: object, field: str
) -> None:
    call = getattr(pb_grpc.EnergyReportsStub(stack.channel), method)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(message, metadata=md(stack.admin_key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.value.details() or "").startswith(f"{field}: ")


async def test_undecodable_request_bytes_are_invalid_argument(stack: Stack) -> None:
    raw = stack.channel.unary_unary("/joulegate.v1.EnergyReports/GetUsage")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await raw(b"\xff\xff\xff", metadata=md(stack.admin_key))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_wait_final_returns_once_final_or_the_provisional_figures_at_the_timeout(stack: Stack) -> None:
    reports = pb_grpc.EnergyReportsStub(stack.channel)
    # E: tenant-a, ended at H + 2 s on b1; not sealed yet.
    insert(stack.app.engine, [Req("E", received_ns=H + 1500 * MS, released_ns=H + 1500 * MS, done_ns=H + 2 * S,
                                  ingested_ns=H + 2 * S)])  # fmt: skip
    request = pb.GetRequestEnergyRequest(request_id="E", wait_final=True, wait_timeout_ms=400)
    t0 = time.perf_counter()
    e = await reports.GetRequestEnergy(request, metadata=md(stack.key))
    assert not e.final and 0.35 < time.perf_counter() - t0 < 2.0

    async def seal_it() -> None:  # as the engine does once its epochs are attributed past its end
        await asyncio.sleep(0.3)
        await asyncio.to_thread(seal, stack.app.engine, ["E"])

    writer = asyncio.create_task(seal_it())
    t0 = time.perf_counter()
    request = pb.GetRequestEnergyRequest(request_id="E", wait_final=True)  # default wait: 30 s
    e = await reports.GetRequestEnergy(request, metadata=md(stack.key))
    await writer
    assert e.final and 0.25 < time.perf_counter() - t0 < 5.0
    # A request not yet written by the ledger is waited for too; NOT_FOUND only at the timeout.
    later = pb.GetRequestEnergyRequest(request_id="F", wait_final=True, wait_timeout_ms=2000)

    async def write_f() -> None:
        await asyncio.sleep(0.3)
        await asyncio.to_thread(insert, stack.app.engine, [Req("F", backend=None, received_ns=E1, done_ns=E1)])

    writer = asyncio.create_task(write_f())
    f = await reports.GetRequestEnergy(later, metadata=md(stack.key))
    await writer
    assert f.final and f.request_id == "F"
    # The client's own deadline caps the wait: a provisional answer, not DEADLINE_EXCEEDED.
    insert(stack.app.engine, [Req("G", received_ns=H, released_ns=H, done_ns=None, status=None, ingested_ns=H)])
    g = await reports.GetRequestEnergy(
        pb.GetRequestEnergyRequest(request_id="G", wait_final=True), metadata=md(stack.key), timeout=1.0
    )
    assert not g.final and not g.HasField("done")


def _reflect_and_call(port: int, key: str) -> tuple[list[str], dict]:
    """What grpcurl does: list services, fetch descriptors by reflection, build the request from JSON, call."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        pool = descriptor_pool.DescriptorPool(db)
        service = pool.FindServiceByName("joulegate.v1.EnergyReports")
        method = service.methods_by_name["GetUsage"]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse('{"groupBy": "TENANT", "start": "2023-11-13T00:00:00Z"}', request_cls())
        call = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
        )
        response = call(request, metadata=md(key), timeout=10)
        return services, json_format.MessageToDict(response)


async def test_reflection_lists_the_service_and_a_generic_client_can_call_it(stack: Stack) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.channel)
    answers = [
        a async for a in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    ]
    names = {s.name for s in answers[0].list_services_response.service}
    assert "joulegate.v1.EnergyReports" in names

    services, usage = await asyncio.to_thread(_reflect_and_call, stack.app.grpc_port, stack.admin_key)
    assert "joulegate.v1.EnergyReports" in services
    assert [(r["key"], r["requests"]) for r in usage["rows"]] == [("tenant-a", "2"), ("tenant-b", "2")]
    assert (
        usage["idlePolicy"] == "IDLE_POLICY_TIME" and usage["pue"] == 1.5 and usage["start"] == "2023-11-13T00:00:00Z"
    )
    assert usage["total"]["totalJ"] == pytest.approx(4.0)
