"""The gateway's errors: one class per way a request can fail, each knowing its gRPC code and its TGI HTTP answer.

Both front doors (gRPC and HTTP) raise and catch these, so a failure reads the same through either: a client's
mistake is INVALID_ARGUMENT / 422 naming what was wrong, overload is RESOURCE_EXHAUSTED / 429 with a retry hint,
and nothing a client can send turns into INTERNAL. Messages are clipped to ``MAX_MESSAGE_CHARS``: an error never
carries megabytes of a client's input (or of a backend's answer) back.
"""

from __future__ import annotations

import grpc
from text_generation import errors as tgi_errors

from proxy.inputs import clip

MAX_MESSAGE_CHARS = 1024


class GatewayError(Exception):
    """Base class. ``message`` is safe to show to the client."""

    grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    http_status: int = 500
    error_type: str = "unknown"  # TGI's `error_type` field in an error body

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message


class InvalidArgument(GatewayError):
    """The request is malformed or its parameters are out of range (TGI's 422 validation errors too)."""

    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    http_status = 422
    error_type = "validation"


class MalformedRequest(InvalidArgument):
    """The request cannot be read at all: a body that is not JSON, a header value that is not printable ASCII, a
    body that does not decompress. HTTP 400 (axum's answer to a body that is not JSON); INVALID_ARGUMENT."""

    http_status = 400


class PayloadTooLarge(InvalidArgument):
    """The body is larger than the gateway takes (after decompression): HTTP 413; INVALID_ARGUMENT."""

    http_status = 413


class BodyRejected(InvalidArgument):
    """The backend refused the body before validating it (axum's plain-text 400/413/422, e.g. ``top_k`` past
    i32). Passed on with the backend's own HTTP status, as TGI answers it (not inside a stream); INVALID_ARGUMENT."""

    def __init__(self, message: str, *, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class Unauthenticated(GatewayError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    http_status = 401
    error_type = "authentication"


class PermissionDenied(GatewayError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    http_status = 403
    error_type = "permission"


class NotFound(GatewayError):
    grpc_code = grpc.StatusCode.NOT_FOUND
    http_status = 404
    error_type = "not_found"


class Overloaded(GatewayError):
    """Queues are full (the gateway's or every backend's); come back after ``retry_after_s``."""

    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 429
    error_type = "overloaded"


class Unavailable(GatewayError):
    """No healthy backend, or the gateway is draining."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 503
    error_type = "unavailable"


class DeadlineExceeded(GatewayError):
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 504
    error_type = "deadline"


class Cancelled(GatewayError):
    grpc_code = grpc.StatusCode.CANCELLED
    http_status = 499
    error_type = "cancelled"


class GenerationFailed(GatewayError):
    """The backend failed while generating (TGI's 424 `generation` / 500 `incomplete_generation`)."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 424
    error_type = "generation"


class Internal(GatewayError):
    """A fault of the gateway itself (a bug, a query the database could not run): never a client's mistake."""

    grpc_code = grpc.StatusCode.INTERNAL
    http_status = 500
    error_type = "internal"


class BackendError(GatewayError):
    """The backend answered something the gateway cannot use (a broken stream, an unexpected status)."""

    grpc_code = grpc.StatusCode.UNAVAILABLE
    http_status = 502
    error_type = "backend"


# axum's rejections of a body it cannot read: 400 not JSON, 413 too large, 422 wrong shape (415 cannot be the
# client's doing: the gateway always sends JSON)
_BODY_REJECTIONS = frozenset({400, 413, 422})


def from_tgi(status: int, body: object, *, backend: str) -> GatewayError:
    """Map a TGI error answer (HTTP status + ``{"error", "error_type"}`` body, or an in-stream error event).

    Classification goes through the ``text-generation`` package's own ``parse_error`` so the gateway reads TGI's
    errors exactly as TGI's Python client does. A 4xx whose body is not a TGI error object is axum refusing the
    request body before TGI saw it (plain text, e.g. ``Failed to deserialize the JSON body into the target type:
    parameters.top_k: invalid value ...``): the client's mistake, passed on as ``BodyRejected`` with its text.
    """
    if not isinstance(body, dict) or "error" not in body:
        if status in _BODY_REJECTIONS:
            text = body.strip() if isinstance(body, str) and body.strip() else f"HTTP {status}"
            return BodyRejected(text, http_status=status)
        return BackendError(f"backend {backend} answered HTTP {status} without a TGI error body")
    message = str(body["error"])
    err = tgi_errors.parse_error(status, {k: str(v) for k, v in body.items()})
    match err:
        case tgi_errors.ValidationError() | tgi_errors.BadRequestError():
            return InvalidArgument(message)
        case tgi_errors.OverloadedError() | tgi_errors.RateLimitExceededError():
            return Overloaded(f"backend {backend}: {message}", retry_after_s=1.0)
        case tgi_errors.GenerationError() | tgi_errors.IncompleteGenerationError():
            return GenerationFailed(f"backend {backend}: {message}")
        case tgi_errors.ShardNotReadyError() | tgi_errors.ShardTimeoutError():
            return Unavailable(f"backend {backend}: {message}")
        case tgi_errors.NotFoundError():
            return BackendError(f"backend {backend}: {message}")
        case _:
            if status == 503:
                return Unavailable(f"backend {backend}: {message}")
            return BackendError(f"backend {backend}: HTTP {status}: {message}")
