"""Non-streamed answers assembled from a backend's stream, and TGI's ``x-*`` headers from the gateway's timeline.

The gateway always streams from TGI (the first token marks the end of prefill), so a client's non-streamed call
is answered by collecting the stream: TGI's ``GenerateResponse`` from ``/generate_stream`` events, a
``chat.completion`` from ``chat.completion.chunk``s, a ``text_completion`` from completion chunks. Pure functions
and small accumulators only: no I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.errors import BackendError
from proxy.http import wire

_OPENAI_FINISH = {"eos_token": "stop"}  # TGI's FinishReason::format(openai_compliant=true)


@dataclass(frozen=True, slots=True)
class Timing:
    """When the gateway did what with one call (wall-clock ns), and what it moved."""

    received_ns: int  # the request arrived
    handed_ns: int  # body read, key checked: handed to the gateway's queue
    released_ns: int | None  # released to a backend
    done_ns: int  # the last token came back
    prompt_tokens: int
    generated_tokens: int


def timing_headers(timing: Timing, *, compute_type: str | None, inputs_chars: int) -> dict[str, str]:
    """TGI's ``x-*`` headers of a non-streamed answer, measured at the gateway.

    total = received -> done; validation = received -> handed (body, auth); queue = handed -> released (the
    shaping hold: TGI's own queue is not visible to a streaming client and counts as inference); inference =
    released -> done; time per token = inference / generated tokens.
    """
    released = timing.released_ns if timing.released_ns is not None else timing.done_ns
    inference_ns = timing.done_ns - released
    out = {
        "x-compute-time": wire.seconds_header(timing.done_ns - timing.received_ns),
        "x-compute-characters": str(inputs_chars),
        "x-total-time": wire.millis_header(timing.done_ns - timing.received_ns),
        "x-validation-time": wire.millis_header(timing.handed_ns - timing.received_ns),
        "x-queue-time": wire.millis_header(released - timing.handed_ns),
        "x-inference-time": wire.millis_header(inference_ns),
        "x-time-per-token": wire.millis_header(inference_ns // max(timing.generated_tokens, 1)),
        "x-prompt-tokens": str(timing.prompt_tokens),
        "x-generated-tokens": str(timing.generated_tokens),
    }
    return {"x-compute-type": compute_type, **out} if compute_type else out


def client_stream_event(event: dict[str, Any], *, details: bool) -> dict[str, Any]:
    """A /generate_stream event as the client asked for it: the gateway always asks TGI for ``details``."""
    if not details and event.get("details") is not None:
        event["details"] = None
    return event


class GenerateAssembler:
    """/generate_stream events in, TGI's ``GenerateResponse`` out."""

    __slots__ = ("final", "tokens", "top_tokens")

    def __init__(self) -> None:
        self.tokens: list[dict[str, Any]] = []
        self.top_tokens: list[list[dict[str, Any]]] = []
        self.final: dict[str, Any] | None = None

    def feed(self, event: dict[str, Any]) -> None:
        token = event.get("token")
        if token is not None:
            self.tokens.append(token)
            self.top_tokens.append(event.get("top_tokens") or [])
        if event.get("details") is not None:
            self.final = event

    def response(self, *, details: bool, top_n_tokens: bool) -> dict[str, Any]:
        if self.final is None:
            raise BackendError("the backend's stream ended before its last token")
        out: dict[str, Any] = {"generated_text": self.final.get("generated_text") or ""}
        if details:
            d = self.final["details"]
            body: dict[str, Any] = {
                "finish_reason": d["finish_reason"],
                "generated_tokens": d["generated_tokens"],
                "seed": d.get("seed"),
                "prefill": [],
                "tokens": self.tokens,
            }
            if top_n_tokens:
                body["top_tokens"] = self.top_tokens
            out["details"] = body
        return out


class ChatAssembler:
    """``chat.completion.chunk``s in, a ``chat.completion`` out."""

    __slots__ = ("_content", "_logprobs", "_tools", "created", "fingerprint", "finish_reason", "id", "usage")

    def __init__(self) -> None:
        self.id = ""
        self.created: int | None = None
        self.fingerprint = ""
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self._content: list[str] = []
        self._logprobs: list[dict[str, Any]] | None = None
        self._tools: dict[int, dict[str, Any]] = {}

    def feed(self, chunk: dict[str, Any]) -> None:
        if self.created is None:
            self.id = chunk.get("id", "")
            self.created = chunk.get("created", 0)
            self.fingerprint = chunk.get("system_fingerprint", "")
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                self._content.append(delta["content"])
            for call in delta.get("tool_calls") or ():
                self._tool_delta(call)
            logprobs = choice.get("logprobs")
            if logprobs:
                self._logprobs = (self._logprobs or []) + list(logprobs.get("content") or ())
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]

    def _tool_delta(self, call: dict[str, Any]) -> None:
        slot = self._tools.setdefault(
            int(call.get("index", 0)), {"id": "", "type": "function", "function": {"name": "", "arguments": ""}}
        )
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        fn = call.get("function") or {}
        if fn.get("name"):
            slot["function"]["name"] = fn["name"]
        if isinstance(fn.get("arguments"), str):
            slot["function"]["arguments"] += fn["arguments"]

    def completion(self, model: str) -> dict[str, Any]:
        if self.finish_reason is None:
            raise BackendError("the backend's stream ended before its last token")
        message: dict[str, Any]
        if self._tools:
            message = {"role": "assistant", "tool_calls": [self._tools[i] for i in sorted(self._tools)]}
        else:
            message = {"role": "assistant", "content": "".join(self._content)}
        return {
            "object": "chat.completion",
            "id": self.id,
            "created": self.created or 0,
            "model": model,
            "system_fingerprint": self.fingerprint,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None if self._logprobs is None else {"content": self._logprobs},
                    "finish_reason": _OPENAI_FINISH.get(self.finish_reason, self.finish_reason),
                }
            ],
            "usage": self.usage or {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }


class CompletionAssembler:
    """One prompt's completion chunks in, its ``choices`` entry (and usage) out."""

    __slots__ = ("_text", "created", "fingerprint", "finish_reason", "usage")

    def __init__(self) -> None:
        self._text: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.created: int | None = None
        self.fingerprint = ""

    def feed(self, chunk: dict[str, Any]) -> None:
        if self.created is None:
            self.created = chunk.get("created", 0)
            self.fingerprint = chunk.get("system_fingerprint", "")
        for choice in chunk.get("choices") or ():
            self._text.append(choice.get("text") or "")
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            self.usage = chunk["usage"]

    def choice(self, index: int) -> dict[str, Any]:
        if self.finish_reason is None:
            raise BackendError("the backend's stream ended before its last token")
        return {
            "index": index,
            "text": "".join(self._text),
            "logprobs": None,
            "finish_reason": _OPENAI_FINISH.get(self.finish_reason, self.finish_reason),
        }


def completion_response(model: str, parts: list[CompletionAssembler]) -> dict[str, Any]:
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    for part in parts:
        for key in usage:
            usage[key] += int((part.usage or {}).get(key, 0))
    return {
        "object": "text_completion",
        "id": "",
        "created": parts[0].created or 0,
        "model": model,
        "system_fingerprint": parts[0].fingerprint,
        "choices": [p.choice(i) for i, p in enumerate(parts)],
        "usage": usage,
    }
