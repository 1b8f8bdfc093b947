"""joulegate's errors: one root, ``JoulegateError``, and one class per way a call or a process can fail.

- ``GatewayError`` and its subclasses: what a call answers with, each knowing its gRPC code and its TGI HTTP answer.
  Every front door (the generation service over gRPC and HTTP, the EnergyReports service) raises and catches these,
  so a failure reads the same through each: a client's mistake is INVALID_ARGUMENT / 422 naming what was wrong,
  overload is RESOURCE_EXHAUSTED / 429 with a retry hint, and nothing a client can send turns into INTERNAL.
  Messages are clipped to ``MAX_MESSAGE_CHARS``: an error never carries megabytes of a client's input back.
- ``ConfigError``: a setting is invalid (the message names the key); a command exits 2.
- ``ConservationError``: the attributed energy does not add up to the counter's — a bug, never papered over.
- ``SchemaMismatchError``: the database's schema is not the one this version writes; a process refuses to start.

Mapping a backend's own error answers onto these lives with the backend's wire format (``proxy.tgi_wire``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

MAX_MESSAGE_CHARS = 1024
MAX_ECHO_CHARS = 64  # of one client value quoted in an error message


def clip(text: str, max_chars: int = MAX_ECHO_CHARS) -> str:
    """``text`` for an error message: at most ``max_chars`` characters, then how long it really was."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}... ({len(text)} characters)"


class JoulegateError(Exception):
    """The root of every error joulegate raises on purpose."""


class ConfigError(JoulegateError, ValueError):
    """The configuration is invalid; the message says which key and why."""


class ConservationError(JoulegateError):
    """Attributed energy plus idle energy differs from what the counter measured: a bug in the attribution."""


class SchemaMismatchError(JoulegateError):
    """The database's schema revision is not this version's: older (run ``joulegate migrate``) or one this version
    does not know (a newer joulegate migrated it). Writing rows into either would fail every second or, worse,
    leave out what a newer schema's readers rely on; a command exits 2."""


class GatewayError(JoulegateError):
    """Base class. ``message`` is safe to show to the client."""

    code_name: str = "UNKNOWN"  # the gRPC status code (no gRPC import here: the meter's pure core imports this module)
    http_status: int = 500
    error_type: str = "unknown"  # TGI's `error_type` field in an error body

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        message = clip(message, MAX_MESSAGE_CHARS)
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        return self.message

    @property
    def grpc_code(self) -> grpc.StatusCode:
        import grpc

        return grpc.StatusCode[self.code_name]


class InvalidArgument(GatewayError):
    """The request is malformed or its parameters are out of range (TGI's 422 validation errors too)."""

    code_name = "INVALID_ARGUMENT"
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
    code_name = "UNAUTHENTICATED"
    http_status = 401
    error_type = "authentication"


class PermissionDenied(GatewayError):
    code_name = "PERMISSION_DENIED"
    http_status = 403
    error_type = "permission"


class NotFound(GatewayError):
    code_name = "NOT_FOUND"
    http_status = 404
    error_type = "not_found"


class Overloaded(GatewayError):
    """Queues are full (the gateway's or every backend's); come back after ``retry_after_s``."""

    code_name = "RESOURCE_EXHAUSTED"
    http_status = 429
    error_type = "overloaded"


class Unavailable(GatewayError):
    """No healthy backend, or the gateway is draining."""

    code_name = "UNAVAILABLE"
    http_status = 503
    error_type = "unavailable"


class DeadlineExceeded(GatewayError):
    code_name = "DEADLINE_EXCEEDED"
    http_status = 504
    error_type = "deadline"


class Cancelled(GatewayError):
    code_name = "CANCELLED"
    http_status = 499
    error_type = "cancelled"


class GenerationFailed(GatewayError):
    """The backend failed while generating (TGI's 424 `generation` / 500 `incomplete_generation`)."""

    code_name = "INTERNAL"
    http_status = 424
    error_type = "generation"


class Internal(GatewayError):
    """A fault of the gateway itself (a bug, a query the database could not run): never a client's mistake."""

    code_name = "INTERNAL"
    http_status = 500
    error_type = "internal"


class BackendError(GatewayError):
    """The backend answered something the gateway cannot use (a broken stream, an unexpected status)."""

    code_name = "UNAVAILABLE"
    http_status = 502
    error_type = "backend"
