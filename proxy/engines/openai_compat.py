"""What vLLM and SGLang share: OpenAI-style error bodies, TGI parameters read for an OpenAI-style engine, and the
readers of their OpenAI routes' streams.

Error bodies. vLLM >= 0.10 answers ``{"error": {"message", "type", "param", "code"}}`` (``ErrorResponse`` with
``ErrorInfo``) with the status in ``code``, both as an HTTP answer and as an in-stream event; vLLM <= 0.9 answered the
flat ``{"object": "error", "message", "type", "code"}`` (read too); SGLang answers ``{"error": {"message"}}`` (and
``{"object": "error", ...}`` on its OpenAI routes). FastAPI's own validation answer is ``{"detail": [...]}``. Every
one becomes TGI's in-stream ``{"error", "error_type"}`` event or the gateway error of its status: 400/422 the
client's (INVALID_ARGUMENT, its message kept), 429 overload, 503 unavailable, anything else the backend's fault.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from typing import Any

from common.errors import (
    BackendError,
    GatewayError,
    GenerationFailed,
    InvalidArgument,
    NotFound,
    Overloaded,
    Unavailable,
)
from proxy.engines.base import SSE_DONE, Event, EventReader
from proxy.tgi_wire import parse_event

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"
OPENAI_ROUTES = frozenset({CHAT_ROUTE, COMPLETIONS_ROUTE})
_CLIENT_STATUSES = frozenset({400, 413, 422})


def error_of(body: object) -> tuple[str, int | None] | None:
    """(message, status code it names) of an OpenAI-style error body or event, None when ``body`` is not one."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, dict) and "message" in error:
        code = error.get("code", error.get("http_status_code"))
        return str(error["message"]), code if isinstance(code, int) else None
    if isinstance(error, str):
        return error, None
    if body.get("object") == "error" and "message" in body:
        code = body.get("code")
        return str(body["message"]), code if isinstance(code, int) else None
    detail = body.get("detail")
    if detail is not None:  # FastAPI's RequestValidationError answer
        if isinstance(detail, list):
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    loc = ".".join(str(x) for x in item.get("loc", ()) if x != "body")
                    parts.append(f"{loc}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
            return "; ".join(parts) or str(detail), 422
        return str(detail), None
    return None


def map_error(status: int, body: object, backend: str, engine: str) -> GatewayError:
    """An HTTP error answer of an OpenAI-style engine as the gateway's error."""
    found = error_of(body)
    if found is None:
        text = body.strip() if isinstance(body, str) else ""
        message = text or f"HTTP {status}"
    else:
        message = found[0]
    if status in _CLIENT_STATUSES:
        return InvalidArgument(message)
    if status == 404:
        return NotFound(f"backend {backend} ({engine}): {message}")
    if status == 429:
        return Overloaded(f"backend {backend} ({engine}): {message}", retry_after_s=1.0)
    if status == 503:
        return Unavailable(f"backend {backend} ({engine}): {message}", retry_after_s=1.0)
    if found is None:
        return BackendError(f"backend {backend} ({engine}) answered HTTP {status} without an error body")
    return GenerationFailed(f"backend {backend} ({engine}): HTTP {status}: {message}")


def error_event(message: str, code: int | None) -> Event:
    """TGI's in-stream ``{"error", "error_type"}`` event for an engine's in-stream error."""
    if code in _CLIENT_STATUSES:
        return {"error": message, "error_type": "validation"}
    if code == 429:
        return {"error": message, "error_type": "overloaded"}
    return {"error": message, "error_type": "generation"}


def check_error_event(event: Event) -> Event | None:
    """The TGI error event of an engine's in-stream error payload, None for any other payload."""
    if "error" not in event and event.get("object") != "error":
        return None
    found = error_of(event)
    if found is None:
        return {"error": str(event.get("error")), "error_type": "generation"}
    return error_event(*found)


def finish_reason(reason: str | None, stop: object) -> str | None:
    """An engine's OpenAI ``finish_reason`` (+ what matched) as TGI's: ``length``, ``eos_token``, ``stop_sequence``.

    vLLM's ``stop_reason`` / SGLang's ``matched_stop`` is the stop string that matched, a stop token id, or None (EOS).
    """
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop_sequence" if isinstance(stop, str) else "eos_token"
    return None


# --- TGI parameters for an OpenAI-style engine ----------------------------------------------------------------------

_UNSUPPORTED_TGI = {
    "best_of": "best_of != 1",
    "decoder_input_details": "decoder_input_details",
    "watermark": "watermark",
}


def sampling(params: dict[str, Any]) -> dict[str, Any]:
    """TGI's sampling parameters as an OpenAI-style engine reads them: greedy is ``temperature: 0``.

    TGI samples when ``do_sample`` is set or any sampling parameter is given; so does this mapping."""
    out: dict[str, Any] = {}
    for name, tgi_default in (("best_of", 1), ("decoder_input_details", False), ("watermark", False)):
        value = params.get(name)
        if value not in (None, tgi_default):
            raise InvalidArgument(
                f"Input validation error: `{name}`: {_UNSUPPORTED_TGI[name]} is not supported by this backend's engine"
            )
    sample = bool(params.get("do_sample")) or any(
        params.get(k) is not None for k in ("temperature", "top_k", "top_p", "typical_p")
    )
    if params.get("typical_p") is not None:
        raise InvalidArgument("Input validation error: `typical_p` is not supported by this backend's engine")
    if not sample:
        out["temperature"] = 0.0
    else:
        out["temperature"] = params["temperature"] if params.get("temperature") is not None else 1.0
        if params.get("top_p") is not None:
            out["top_p"] = params["top_p"]
        if params.get("top_k") is not None:
            out["top_k"] = params["top_k"]
    for name in ("repetition_penalty", "frequency_penalty", "seed"):
        if params.get(name) is not None:
            out[name] = params[name]
    return out


class ChunkReader(EventReader):
    """A reader of an engine's JSON chunks. ``[DONE]`` ends the stream (what the reader holds goes out); an error
    payload goes out as TGI's error event, after what the reader held; every other chunk goes to ``chunk``."""

    __slots__ = ("_backend",)

    def __init__(self, backend: str) -> None:
        self._backend = backend

    def feed(self, datas: Iterable[str]) -> list[Event]:
        out: list[Event] = []
        for data in datas:
            if data == SSE_DONE:
                out.extend(self.close())
                continue
            event = parse_event(data, self._backend)
            err = check_error_event(event)
            if err is not None:
                out.extend(self.close())
                out.append(err)
                continue
            self.chunk(event, out)
        return out

    @abc.abstractmethod
    def chunk(self, event: Event, out: list[Event]) -> None:
        """Read one chunk that is neither ``[DONE]`` nor an error; append what goes out to ``out``."""


class OpenAIPassthrough(ChunkReader):
    """An OpenAI route's chunks as TGI's OpenAI routes send them: passed on, with two repairs.

    - An error payload becomes TGI's ``{"error", "error_type"}`` event.
    - ``/v1/completions``: the engine sends the usage as a chunk of its own (``choices: []``) after the last token's
      chunk; TGI puts it on that last chunk, and the gateway's assembler and clients read it there. The chunk with the
      ``finish_reason`` is held until the usage (or the stream's end) and goes out with it.
    """

    __slots__ = ("_held", "_merge_usage")

    def __init__(self, route: str, backend: str) -> None:
        super().__init__(backend)
        self._merge_usage = route == COMPLETIONS_ROUTE
        self._held: Event | None = None

    def chunk(self, event: Event, out: list[Event]) -> None:
        if not self._merge_usage:
            out.append(event)
            return
        choices = event.get("choices") or []
        if not choices and event.get("usage"):
            if self._held is not None:
                held, self._held = self._held, None
                held["usage"] = event["usage"]
                out.append(held)
            else:
                out.append(event)
            return
        if any(c.get("finish_reason") for c in choices):
            out.extend(self.close())
            self._held = event
            return
        out.append(event)

    def close(self) -> list[Event]:
        held, self._held = self._held, None
        return [held] if held is not None else []
