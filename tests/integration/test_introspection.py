"""Server reflection in both versions (``grpc.reflection.v1``, ``v1alpha``) and health for every served service,
on the gateway's port and on the meter daemon's reports port (``joulegate meter --grpc-listen``).

Tools ask ``grpc.reflection.v1`` first (grpcurl, grpcui, Postman) and some never fall back. The two versions are the
same messages with the same field numbers under another package, so the client here speaks ``v1`` on the ``v1``
method path with the ``v1alpha`` message classes; everything else it learns from the server: it lists the services,
fetches each one's file descriptor, checks that the descriptor declares it, builds the health service's messages
from the reflected descriptor alone (a generic client, like grpcurl) and asks each service's health.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as wire

from app.config import load_config
from app.metering import authenticator, settings_from_config
from meter.reports_api import start_reports_server

from .harness import running_stack

VERSIONS = ("grpc.reflection.v1", "grpc.reflection.v1alpha")
GATEWAY_SERVICES = {
    "fmaas.GenerationService",
    "joulegate.v1.EnergyReports",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


async def _ask(channel: grpc.aio.Channel, version: str, *requests: wire.ServerReflectionRequest) -> list:
    call = channel.stream_stream(
        f"/{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=wire.ServerReflectionRequest.SerializeToString,
        response_deserializer=wire.ServerReflectionResponse.FromString,
    )
    return [answer async for answer in call(iter(requests))]


async def _files_declaring(channel: grpc.aio.Channel, version: str, symbol: str) -> list:
    [answer] = await _ask(channel, version, wire.ServerReflectionRequest(file_containing_symbol=symbol))
    assert answer.WhichOneof("message_response") == "file_descriptor_response", (symbol, answer)
    return [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in answer.file_descriptor_response.file_descriptor_proto
    ]


async def _check_server(channel: grpc.aio.Channel, expected: set[str]) -> None:
    for version in VERSIONS:
        [listing] = await _ask(channel, version, wire.ServerReflectionRequest(list_services=""))
        names = {s.name for s in listing.list_services_response.service}
        assert names == expected, version
        for name in names:
            package, _, service = name.rpartition(".")
            files = await _files_declaring(channel, version, name)
            assert any(f.package == package and service in [s.name for s in f.service] for f in files), name

    # the v1 protocol reflects itself: package grpc.reflection.v1, and the v1alpha messages field for field
    [v1] = [f for f in await _files_declaring(channel, "grpc.reflection.v1", "grpc.reflection.v1.ServerReflection")
            if f.package == "grpc.reflection.v1"]  # fmt: skip
    assert v1.name == "grpc/reflection/v1/reflection.proto"
    alpha = descriptor_pb2.FileDescriptorProto.FromString(wire.DESCRIPTOR.serialized_pb)
    assert [(m.name, [(f.name, f.number, f.type) for f in m.field]) for m in v1.message_type] == [
        (m.name, [(f.name, f.number, f.type) for f in m.field]) for m in alpha.message_type
    ]

    # a generic client: the health service's messages built from what v1 reflection returned, nothing compiled in
    pool = descriptor_pool.DescriptorPool()
    for f in await _files_declaring(channel, "grpc.reflection.v1", "grpc.health.v1.Health"):
        pool.Add(f)
    check = pool.FindServiceByName("grpc.health.v1.Health").methods_by_name["Check"]
    request_cls = message_factory.GetMessageClass(check.input_type)
    response_cls = message_factory.GetMessageClass(check.output_type)
    call = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=request_cls.SerializeToString,
        response_deserializer=response_cls.FromString,
    )
    for name in ["", *sorted(expected)]:
        answer = await call(request_cls(service=name))
        assert check.output_type.fields_by_name["status"].enum_type.values_by_number[answer.status].name == "SERVING"


async def test_the_gateway_serves_both_reflection_versions_and_health_for_every_service(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as s:
        await _check_server(s.channel, GATEWAY_SERVICES)
        await s.app.stop(0.5)  # a drain: every name goes NOT_SERVING
        # the server takes no calls once stopped: ask the servicer it answered with
        for name in ["", *GATEWAY_SERVICES]:
            status = await s.app.health.servicer.Check(health_pb2.HealthCheckRequest(service=name), None)
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING, name


@asynccontextmanager
async def _reports_server(tmp_path: Path) -> AsyncIterator[grpc.aio.Channel]:
    from meter.store import ensure_schema, make_engine

    config = load_config(environ={}, overrides={"db": {"url": f"sqlite:///{tmp_path / 'jg.db'}"}})
    engine = make_engine(config.db.url)
    ensure_schema(engine)
    server = await start_reports_server(
        engine, authenticator(config, engine), settings_from_config(config), "127.0.0.1:0"
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield channel
    finally:
        await server.stop(0.5)
        engine.dispose()


async def test_the_meter_daemon_reports_port_serves_both_versions_and_health(tmp_path: Path) -> None:
    async with _reports_server(tmp_path) as channel:
        await _check_server(
            channel,
            {
                "joulegate.v1.EnergyReports",
                "grpc.health.v1.Health",
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            },
        )


async def test_an_unknown_service_name_is_not_found(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as s:
        health = health_pb2_grpc.HealthStub(s.channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
