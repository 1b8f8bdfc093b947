"""gRPC server reflection (``grpc.reflection.v1`` and ``v1alpha``) and the health service, for every served service.

Why both reflection versions: current clients (grpcurl, Postman, grpcui, grpc-java/go tooling) ask
``grpc.reflection.v1.ServerReflection`` first and some never fall back, while older ones only know ``v1alpha``. The
``grpcio-reflection`` package serves only ``v1alpha``. The two protocols are the same messages with the same field
numbers under another package name, so ``v1`` is served by the same servicer: its file descriptor is made from the
``v1alpha`` one with the package renamed (registered in the default pool, so reflection can describe itself), and its
method decodes and encodes the (wire-identical) ``v1alpha`` messages.

Health: a client may ask for the overall status (``""``) or for any service it calls by name; each name the server
serves gets a status, so a probe that names ``joulegate.v1.EnergyReports`` is not answered ``NOT_FOUND``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA_SERVICE = reflection.SERVICE_NAME  # grpc.reflection.v1alpha.ServerReflection
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
HEALTH_SERVICE = health.SERVICE_NAME
REFLECTION_SERVICES = (V1_SERVICE, V1ALPHA_SERVICE)


def _renamed(type_name: str) -> str:
    old = f".{v1alpha_pb2.DESCRIPTOR.package}."
    return f".{V1_PACKAGE}." + type_name.removeprefix(old) if type_name.startswith(old) else type_name


def reflection_v1_file() -> FileDescriptor:
    """``grpc/reflection/v1/reflection.proto``, in the default descriptor pool (added on first use)."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(V1_FILE)
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto.FromString(v1alpha_pb2.DESCRIPTOR.serialized_pb)
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    proto.ClearField("options")
    for message in proto.message_type:
        for f in message.field:
            if f.type_name:
                f.type_name = _renamed(f.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = _renamed(method.input_type)
            method.output_type = _renamed(method.output_type)
    pool.AddSerializedFile(proto.SerializeToString())
    return pool.FindFileByName(V1_FILE)


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> tuple[str, ...]:
    """Serve reflection (both versions) for ``services`` plus health and reflection themselves. Returns every
    service name reflection lists."""
    reflection_v1_file()
    names = tuple(dict.fromkeys([*services, HEALTH_SERVICE, *REFLECTION_SERVICES]))
    servicer = reflection.aio.ReflectionServicer(names)
    method = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=v1alpha_pb2.ServerReflectionRequest.FromString,
        response_serializer=v1alpha_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in REFLECTION_SERVICES:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": method}),)
        )
    return names


class Health:
    """The health service of one server: a status for ``""`` and for each served service name."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def set(self, names: Sequence[str], serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await self.servicer.set(name, status)

    async def shutdown(self) -> None:
        """Every name NOT_SERVING, for good (a drain)."""
        await self.servicer.enter_graceful_shutdown()


def add_introspection(server: grpc.aio.Server, services: Iterable[str]) -> tuple[Health, tuple[str, ...]]:
    """Health and reflection (both versions) on ``server`` for ``services``: the health service, and every service
    name reflection lists (each gets a health status of its own)."""
    health_service = Health(server)
    return health_service, enable_reflection(server, services)
