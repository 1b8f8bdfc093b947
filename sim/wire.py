"""TGI's JSON and Server-Sent Events on the wire, byte for byte where it matters.

TGI serializes with serde_json (compact, non-ASCII left as is, struct fields in declaration order) and frames SSE
with axum: ``data:<json>\\n\\n`` with no space after the colon, ``data:[DONE]\\n\\n`` for the OpenAI routes, and an
empty comment ``:\\n\\n`` as keep-alive after 15 s of silence. A NaN logprob (the first prompt token's) is ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any

from common.tgi_http import SSE_DONE as SSE_DONE
from common.tgi_http import Info as Info
from common.tgi_http import StreamResponse, Token, openai_error
from common.tgi_http import error_body as error_body
from common.tgi_http import millis_header as millis_header
from common.tgi_http import seconds_header as seconds_header
from sim.tokenizer import VocabEntry

SSE_KEEPALIVE = b":\n\n"
KEEPALIVE_INTERVAL_S = 15.0

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj).encode("utf-8")


def sse(obj: Any) -> bytes:
    return b"data:" + dumps(obj) + b"\n\n"


def openai_error_event(message: str) -> bytes:
    """What TGI streams on the OpenAI routes when generation fails (``common.tgi_http.openai_error``)."""
    return sse(openai_error(message))


def logprob(value: float) -> float | None:
    return None if math.isnan(value) else value


def token(entry: VocabEntry) -> Token:
    return {"id": entry.id, "text": entry.text, "logprob": entry.logprob, "special": entry.special}


def stream_token_event(index: int, entry: VocabEntry) -> bytes:
    """An intermediate ``StreamResponse`` without top tokens: the hot path, formatted without a JSON encoder."""
    return b'data:{"index":%d,"token":%s,"generated_text":null,"details":null}\n\n' % (index, entry.json)


def stream_response(
    index: int,
    entry: VocabEntry,
    top: list[VocabEntry],
    generated_text: str | None,
    details: dict[str, Any] | None,
) -> StreamResponse:
    """A ``StreamResponse``: index, token, top_tokens (left out when empty), generated_text, details."""
    if top:
        return {
            "index": index,
            "token": token(entry),
            "top_tokens": [token(t) for t in top],
            "generated_text": generated_text,
            "details": details,
        }
    return {"index": index, "token": token(entry), "generated_text": generated_text, "details": details}
