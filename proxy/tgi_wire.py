"""TGI's wire format, read in one place: its error answers, its stream events, and the texts the gateway parses.

- ``from_tgi``: a TGI error answer (HTTP status and ``{"error", "error_type"}`` body, or the same as an in-stream
  event) as the ``GatewayError`` a client sees, classified through the ``text-generation`` package's own parser.
- ``stream_error``: an in-stream error event, from ``/generate_stream`` or from the OpenAI-compatible routes (which
  send only TGI's message text, always with 422: its prefix says what kind of error it is).
- ``parse_event``: one SSE ``data`` payload as a JSON object (``SSE_DONE`` ends the OpenAI routes' streams).
- ``token_limit``: TGI's "too many tokens for the model" validation message, read for TGIS's TOKEN_LIMIT semantics.

Pure functions, no I/O.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from text_generation import errors as tgi_errors

from common.errors import (
    BackendError,
    BodyRejected,
    GatewayError,
    GenerationFailed,
    InvalidArgument,
    Overloaded,
    Unavailable,
)

# TGI's OpenAI-compatible routes stream chat.completion chunks, not /generate_stream events: Job.route picks the reader.
OPENAI_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions"})
SSE_DONE = "[DONE]"  # the OpenAI routes' last event: not JSON, nothing to observe
# TGI's InferError texts (router/src/infer/mod.rs) -> error_type; the OpenAI routes send only the text, always with 422
OPENAI_ERROR_TYPES = (
    ("Input validation error", "validation"),
    ("Model is overloaded", "overloaded"),
    ("Request failed during generation", "generation"),
    ("Incomplete generation", "incomplete_generation"),
    ("Failed applying chat template", "validation"),
    ("Tool error", "validation"),
    ("Missing template vatiable", "validation"),  # sic, TGI's spelling
)
# TGI: "`inputs` tokens + `max_new_tokens` must be <= 2048. Given: 2000 `inputs` tokens and 100 `max_new_tokens`"
_TOKEN_LIMIT_RE = re.compile(r"must be <= (\d+)\. Given: (\d+) `inputs` tokens and (\d+) `max_new_tokens`")


def token_limit(message: str) -> tuple[int, int] | None:
    """(the model's token limit, the prompt's tokens) from TGI's validation message, None for any other message."""
    m = _TOKEN_LIMIT_RE.search(message)
    return (int(m.group(1)), int(m.group(2))) if m else None


def stream_error(event: dict[str, Any], backend: str) -> GatewayError:
    """An in-stream error event: TGI's ``{"error", "error_type"}`` or the OpenAI routes' ``{"error": {"message"}}``."""
    error = event["error"]
    if isinstance(error, dict):
        message = str(error.get("message", ""))
        error_type = next((t for prefix, t in OPENAI_ERROR_TYPES if message.startswith(prefix)), "unknown")
        event = {"error": message, "error_type": error_type}
    return from_tgi(200, event, backend=backend)


def parse_event(data: str, backend: str) -> dict[str, Any]:
    """One SSE ``data`` payload as a JSON object; BackendError when it is not one."""
    try:
        event = orjson.loads(data)  # one per token: orjson is several times faster than json here
    except orjson.JSONDecodeError as exc:
        raise BackendError(f"backend {backend} sent an event that is not JSON") from exc
    if not isinstance(event, dict):
        raise BackendError(f"backend {backend} sent an event that is not an object")
    return event


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
