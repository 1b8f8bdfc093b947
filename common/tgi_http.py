"""TGI's HTTP conventions that the gateway's HTTP front door and the simulated TGI both write, byte for byte: the
error body, the OpenAI routes' stream end and in-stream error, the ``x-*`` duration headers as Rust prints them, and
TGI's ``Token``, ``StreamResponse`` and ``Info`` as TypedDicts.

Each side encodes JSON with its own encoder (``proxy.http.wire``: orjson, re-encoding what a backend sent;
``sim.wire``: serde_json's output exactly), so what is shared here is data and text, not the encoder.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, NotRequired, TypedDict

SSE_DONE = b"data:[DONE]\n\n"  # the OpenAI routes' last event


class Token(TypedDict):
    """TGI's ``Token``."""

    id: int
    text: str
    logprob: float
    special: bool


class StreamResponse(TypedDict):
    """TGI's ``StreamResponse`` (one ``/generate_stream`` event); ``top_tokens`` is left out when empty."""

    index: int
    token: Token
    top_tokens: NotRequired[list[Token]]
    generated_text: str | None
    details: dict[str, Any] | None  # StreamDetails, on the last event only


class Info(TypedDict):
    """TGI's ``Info`` (``GET /info``), fields in TGI's order."""

    model_id: str
    model_sha: str | None
    model_pipeline_tag: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_tokens: int
    max_total_tokens: int
    validation_workers: int
    max_client_batch_size: int
    router: str
    version: str
    sha: str | None
    docker_label: str | None


def error_body(message: str, error_type: str) -> dict[str, str]:
    """TGI's ``ErrorResponse``."""
    return {"error": message, "error_type": error_type}


def openai_error(message: str) -> dict[str, Any]:
    """TGI's ``InferError::into_openai_event``: the OpenAI routes' in-stream error, always ``http_status_code`` 422."""
    return {"error": {"message": message, "http_status_code": 422}}


def seconds_header(ns: int) -> str:
    """A duration in seconds as Rust prints an f64 (shortest round-trip digits, no exponent, ``1`` for 1.0)."""
    text = format(Decimal(repr(max(ns, 0) / 1e9)), "f")
    return text[:-2] if text.endswith(".0") else text


def millis_header(ns: int) -> str:
    """A duration in whole milliseconds, truncated as Rust's ``Duration::as_millis``."""
    return str(max(ns, 0) // 1_000_000)
