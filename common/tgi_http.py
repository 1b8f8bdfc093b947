"""TGI's HTTP conventions that the gateway's HTTP front door and the simulated TGI both write, byte for byte: the
error body, the OpenAI routes' stream end and in-stream error, and the ``x-*`` duration headers as Rust prints them.

Each side encodes JSON with its own encoder (``proxy.http.wire``: orjson, re-encoding what a backend sent;
``sim.wire``: serde_json's output exactly), so what is shared here is data and text, not the encoder.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

SSE_DONE = b"data:[DONE]\n\n"  # the OpenAI routes' last event


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
