"""What every grpc.aio servicer of joulegate does around a call: read the metadata it needs, and end a failed call
with the status of its ``GatewayError`` (a retry hint where there is one), never with UNKNOWN and a Python message.

The request path (``fmaas.GenerationService``) and the meter (``joulegate.v1.EnergyReports``) both use it.
"""

from __future__ import annotations

import dataclasses

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.errors import GatewayError, Internal, MalformedRequest
from common.inputs import InputRefused, headers_of_interest

log = structlog.get_logger(__name__)


async def abort_with(context: grpc.aio.ServicerContext, exc: GatewayError, request_id: str | None = None) -> None:
    """End the call with ``exc``'s status; RESOURCE_EXHAUSTED/UNAVAILABLE carry a retry hint.

    The hint travels twice: as ``google.rpc.RetryInfo`` in the rich status details (what gRPC client libraries
    read) and as plain ``retry-after-ms`` trailing metadata (what a person with grpcurl reads). ``request_id`` goes
    into the trailing metadata as ``x-request-id``, for a client that got no initial metadata.
    """
    trailing: tuple[tuple[str, str | bytes], ...] = (("x-request-id", request_id),) if request_id else ()
    if exc.retry_after_s is None:
        await context.abort(exc.grpc_code, exc.message, trailing_metadata=trailing)
        return
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(exc.retry_after_s * 1e9))
    detail = status_pb2.Status(code=getattr(code_pb2, exc.grpc_code.name), message=exc.message)
    detail.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = rpc_status.to_status(detail)
    status = _Status(
        status.code,
        status.details,
        (*status.trailing_metadata, ("retry-after-ms", str(int(exc.retry_after_s * 1000))), *trailing),
    )
    await context.abort_with_status(status)


@dataclasses.dataclass(frozen=True)
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def metadata_dict(context: grpc.aio.ServicerContext, names: tuple[str, ...]) -> dict[str, str]:
    """The metadata named in ``names`` (lower case) that the call carries, each value checked: INVALID_ARGUMENT
    naming the key when it is not printable ASCII of a sane length (``common.inputs``)."""
    md = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
    try:
        return headers_of_interest(md, names)
    except InputRefused as exc:
        raise MalformedRequest(str(exc)) from None


def as_status_error(caught: BaseException, method: str, request_id: str | None) -> GatewayError:
    """What a call that raised ``caught`` answers: a GatewayError as it is; anything else is a bug of ours, logged
    with its traceback (call it in the ``except`` block) and answered as INTERNAL with the request id."""
    if isinstance(caught, GatewayError):
        return caught
    log.exception("request_crashed", method=method)
    return Internal(f"internal error (request id {request_id or 'unknown'})")
