"""Gateway errors as TGI's HTTP answers: ``{"error", "error_type"}`` bodies, status codes, Retry-After.

Two ways to fail a stream, chosen by where the failure came from (``in_stream``):

- TGI itself never fails ``/generate_stream`` with a status code once it has read the body: validation errors,
  overload and generation failures arrive inside an HTTP 200 stream as one ``{"error", "error_type"}`` event.
  Whatever a *backend* refused is passed on the same way, so clients see what TGI would have shown them. (A body
  axum could not read at all is answered with a plain-text status; ``BodyRejected`` keeps that status.)
- What only the gateway can refuse (a missing key, an unknown model, its own full queue, no healthy backend, a
  drain) happens before any backend is involved and keeps its HTTP status (401, 404, 429 with Retry-After, 503).

Clients see TGI's own message text; the backend's name, which the gateway adds for its logs, is left out.
"""

from __future__ import annotations

import math
import re

from aiohttp import web

from common.errors import BodyRejected, GatewayError, GenerationFailed, InvalidArgument, MalformedRequest, Overloaded
from proxy.http import wire

_BACKEND_PREFIX = re.compile(r"^backend \S+: ")


class MalformedBody(MalformedRequest):
    """The body is not JSON at all (axum answers 400 here, 422 for JSON of the wrong shape)."""


def client_message(exc: GatewayError) -> str:
    return _BACKEND_PREFIX.sub("", exc.message)


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> web.Response:
    """A non-streamed error answer; 429 and 503 carry ``Retry-After`` (whole seconds, rounded up)."""
    out = dict(headers or {})
    if exc.retry_after_s is not None or isinstance(exc, Overloaded):
        out["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s or 1.0)))
    return web.Response(
        body=wire.dumps(wire.error_body(client_message(exc), exc.error_type)),
        status=exc.http_status,
        headers=out,
        content_type="application/json",
    )


def in_stream(exc: GatewayError, *, released: bool) -> bool:
    """Whether TGI would have reported ``exc`` inside an HTTP 200 stream (see the module docstring).

    ``released``: the request had reached a backend when it failed.
    """
    if not released:
        return False  # refused before any backend saw it: the gateway's own answer, with its status
    if isinstance(exc, BodyRejected):
        return False  # axum refused the body before TGI's stream began: TGI answers it with its status too
    return isinstance(exc, InvalidArgument | Overloaded | GenerationFailed)


def tgi_error_event(exc: GatewayError) -> bytes:
    return wire.sse(wire.error_body(client_message(exc), exc.error_type))


def openai_error_event(exc: GatewayError) -> bytes:
    return wire.openai_error_event(client_message(exc))
