"""JSON and Server-Sent Events as TGI writes them: compact JSON, ``data:<json>\\n\\n`` frames, ``data:[DONE]``.

TGI serialises with serde_json (no spaces, non-ASCII as is, fields in declaration order) and frames SSE with axum
(no space after ``data:``). Python dicts keep the order the backend sent and orjson prints shortest round-trip
floats, so re-encoding a parsed event gives the backend's bytes back, up to the spelling of very small or large
floats (serde writes ``1e-5`` where orjson writes ``0.00001``; both parse to the same number).
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from common.tgi_http import SSE_DONE as SSE_DONE
from common.tgi_http import error_body as error_body
from common.tgi_http import millis_header as millis_header
from common.tgi_http import openai_error
from common.tgi_http import seconds_header as seconds_header

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)  # one per token on streams: several times faster than json


def json_response(obj: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(obj), status=status, headers=headers, content_type="application/json")


def sse(obj: Any) -> bytes:
    return b"data:" + dumps(obj) + b"\n\n"


def openai_error_event(message: str) -> bytes:
    """The OpenAI routes' in-stream error event (``common.tgi_http.openai_error``)."""
    return sse(openai_error(message))


_MODEL_KEY = b'"model":"'


def model_field(events: bytes) -> bytes | None:
    """The first ``"model":"..."`` of SSE events' JSON bytes (key and value as sent), None when there is none or its
    value has an escape. With its quotes unescaped it can only be a key named ``model`` (quotes inside a JSON string
    are escaped), and in an OpenAI chunk only the chunk's own ``model`` has that name."""
    start = events.find(_MODEL_KEY)
    if start < 0:
        return None
    end = events.find(b'"', start + len(_MODEL_KEY))
    if end < 0 or b"\\" in events[start:end]:
        return None
    return events[start : end + 1]


def sse_events(events: bytes) -> list[Any]:
    """The JSON payloads of single-line ``data:{...}`` SSE events, each ended by a blank line (a ``PlainRun``)."""
    return [orjson.loads(event[5:]) for event in events.split(b"\n\n") if event]


def rename_model(events: bytes, n: int, ours: bytes) -> bytes | None:
    """``n`` SSE events (a ``PlainRun``) with every chunk's ``"model":"..."`` made ``ours`` (``"model":<JSON>``);
    None unless every chunk has the same one, exactly once (the caller then parses the chunks and renames each)."""
    theirs = model_field(events)
    if theirs is None:
        return None
    if theirs == ours:
        return events
    grow = len(ours) - len(theirs)
    if grow:  # in every chunk once, or not: the length tells, without counting first
        out = events.replace(theirs, ours)
        return out if len(out) - len(events) == grow * n else None
    return events.replace(theirs, ours) if events.count(theirs) == n else None
