"""Register a grpc.aio servicer so that a malformed request is INVALID_ARGUMENT, not INTERNAL.

grpcio's generated ``add_*_to_server`` parses request bytes before the servicer runs and answers a parse failure
with INTERNAL ("Exception deserializing request!"). That is a client's mistake reported as a server fault; this
module builds the same method handlers from the service descriptor with a deserializer that hands the failure to a
wrapper, which answers INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import descriptor, message_factory
from google.protobuf.message import DecodeError


class _Malformed:
    __slots__ = ("error", "type_name")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error


def _lenient(cls: type[Any]) -> Callable[[bytes], Any]:
    name = cls.DESCRIPTOR.full_name

    def parse(raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except (DecodeError, RuntimeWarning, ValueError) as exc:
            return _Malformed(name, str(exc) or type(exc).__name__)

    return parse


def _abort_message(bad: _Malformed) -> str:
    return f"request: not a valid {bad.type_name} message ({bad.error})"


def _unary(method: Callable[..., Any]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _abort_message(request))
        return await method(request, context)

    return handler


def _server_stream(method: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _abort_message(request))
        async for item in method(request, context):
            yield item

    return handler


def add_servicer(server: grpc.aio.Server, service: descriptor.ServiceDescriptor, servicer: Any) -> None:
    """Register ``servicer`` (methods named as in ``service``; unary-unary or unary-stream) on ``server``."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        if m.client_streaming:
            raise ValueError(f"{m.full_name}: client streaming is not supported here")
        request_cls = message_factory.GetMessageClass(m.input_type)
        response_cls = message_factory.GetMessageClass(m.output_type)
        impl = getattr(servicer, m.name)
        if m.server_streaming:
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(
                _server_stream(impl),
                request_deserializer=_lenient(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                _unary(impl),
                request_deserializer=_lenient(request_cls),
                response_serializer=response_cls.SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def bind_grpc(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    """Bind ``server`` to ``address`` (HOST:PORT; port 0 picks one), over TLS when ``credentials`` are given
    (common.tls); the bound port. OSError when it cannot listen there (grpcio says so only by answering port 0)."""
    if credentials is not None:
        port = server.add_secure_port(address, credentials)
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port
