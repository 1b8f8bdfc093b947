"""JSON and Server-Sent Events as TGI writes them: compact JSON, ``data:<json>\\n\\n`` frames, ``data:[DONE]``.

TGI serialises with serde_json (no spaces, non-ASCII as is, fields in declaration order) and frames SSE with axum
(no space after ``data:``). Python dicts keep the order the backend sent and orjson prints shortest round-trip
floats, so re-encoding a parsed event gives the backend's bytes back, up to the spelling of very small or large
floats (serde writes ``1e-5`` where orjson writes ``0.00001``; both parse to the same number).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

SSE_DONE = b"data:[DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)  # one per token on streams: several times faster than json


def json_response(obj: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(obj), status=status, headers=headers, content_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data:" + dumps(obj) + b"\n\n"


def error_body(message: str, error_type: str) -> dict[str, str]:
    return {"error": message, "error_type": error_type}


def openai_error_event(message: str) -> bytes:
    """TGI's ``InferError::into_openai_event``: the OpenAI routes' in-stream error, always ``http_status_code`` 422."""
    return sse({"error": {"message": message, "http_status_code": 422}})


def seconds_header(ns: int) -> str:
    """A duration in seconds as Rust prints an f64 (shortest round-trip digits, no exponent, ``1`` for 1.0)."""
    text = format(Decimal(repr(max(ns, 0) / 1e9)), "f")
    return text[:-2] if text.endswith(".0") else text


def millis_header(ns: int) -> str:
    """A duration in whole milliseconds, truncated as Rust's ``Duration::as_millis``."""
    return str(max(ns, 0) // 1_000_000)
