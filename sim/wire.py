"""TGI's JSON and Server-Sent Events on the wire, byte for byte where it matters.

TGI serializes with serde_json (compact, non-ASCII left as is, struct fields in declaration order) and frames SSE
with axum: ``data:<json>\\n\\n`` with no space after the colon, ``data:[DONE]\\n\\n`` for the OpenAI routes, and an
empty comment ``:\\n\\n`` as keep-alive after 15 s of silence. A NaN logprob (the first prompt token's) is ``null``.
"""

from __future__ import annotations

import json
import math
from typing import Any, NotRequired, TypedDict

from common.tgi_http import SSE_DONE as SSE_DONE
from common.tgi_http import error_body as error_body
from common.tgi_http import millis_header as millis_header
from common.tgi_http import openai_error
from common.tgi_http import seconds_header as seconds_header
from sim.tokenizer import VocabEntry

SSE_KEEPALIVE = b":\n\n"
KEEPALIVE_INTERVAL_S = 15.0

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def dumps(obj: Any) -> bytes:
    return _encoder.encode(obj).encode("utf-8")


def sse(obj: Any) -> bytes:
    return b"data:" + dumps(obj) + b"\n\n"


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
