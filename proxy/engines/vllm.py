"""vLLM's OpenAI-compatible server (vllm/entrypoints/openai/api_server.py, followed at v0.10).

Identified by ``GET /version`` (``{"version"}``) and ``GET /v1/models`` (its served model name and ``max_model_len``).

- TGI and TGIS requests go to ``POST /v1/completions`` streamed, with ``stream_options: {include_usage,
  continuous_usage_stats}`` (every chunk carries the usage, so the prompt's token count is known with the first
  token) and ``include_stop_str_in_output`` (TGI keeps the stop sequence in the text; the TGIS front door trims it
  when asked). TGI's parameters map onto the OpenAI request and vLLM's extras: ``top_k``, ``repetition_penalty``,
  ``truncate_prompt_tokens``, ``guided_json`` / ``guided_regex`` (TGI's ``grammar``), ``logprobs`` (TGI's
  ``top_n_tokens``), an ``adapter_id`` as the model (a LoRA vLLM serves by name). ``typical_p``, ``best_of`` and
  ``watermark`` have no vLLM equivalent: INVALID_ARGUMENT.
- Each completion chunk becomes TGI's stream event; the last carries TGI's ``details`` (finish reason from
  ``finish_reason`` + ``stop_reason``: a stop string is ``stop_sequence``, EOS or a stop token ``eos_token``; token
  counts from the usage). vLLM does not send token ids on this route: TGI's ``token.id`` is 0.
- The OpenAI routes go to the same routes of vLLM, the model renamed to the served one and the usage asked for.
- Errors: 400 with ``{"error": {...}}`` (vLLM never answers 429: it queues past ``max_num_seqs``); a context-length
  refusal ("'max_tokens' or 'max_completion_tokens' is too large: ...") is read for TGIS's TOKEN_LIMIT semantics.
"""

from __future__ import annotations

import re
from typing import Any

from common.errors import BackendError, GatewayError, InvalidArgument
from proxy.engines.base import CACHED_TOKENS, BackendLike, Engine, Event, EventReader, served_model
from proxy.engines.openai_compat import (
    COMPLETIONS_ROUTE,
    OPENAI_ROUTES,
    ChunkReader,
    OpenAIPassthrough,
    finish_reason,
    map_error,
    sampling,
)

# serving_engine.py _validate_input (v0.10)
_TOO_LARGE = re.compile(
    r"is too large: (\d+)\. This model's maximum context length is (\d+) tokens and your request has (\d+) input tokens"
)


def completion_body(body: dict[str, Any], model: str) -> dict[str, Any]:
    """A TGI ``/generate_stream`` body as vLLM's streamed ``/v1/completions`` request."""
    params = dict(body.get("parameters") or {})
    out: dict[str, Any] = {
        "model": params.get("adapter_id") or model,
        "prompt": body.get("inputs", ""),
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "include_stop_str_in_output": True,
        **sampling(params),
    }
    if params.get("max_new_tokens") is not None:
        out["max_tokens"] = params["max_new_tokens"]
    if params.get("stop"):
        out["stop"] = list(params["stop"])
    if params.get("truncate"):
        out["truncate_prompt_tokens"] = params["truncate"]
    if params.get("top_n_tokens"):
        out["logprobs"] = params["top_n_tokens"]
    grammar = params.get("grammar")
    if isinstance(grammar, dict):
        if grammar.get("type") == "json":
            out["guided_json"] = grammar.get("value")
        elif grammar.get("type") == "regex":
            out["guided_regex"] = grammar.get("value")
        else:
            raise InvalidArgument(f"Input validation error: `grammar.type`: {grammar.get('type')!r} is not supported")
    if "add_special_tokens" in body:
        out["add_special_tokens"] = body["add_special_tokens"]
    return out


class CompletionsToTgi(ChunkReader):
    """vLLM's completion chunks as TGI's ``/generate_stream`` events.

    The chunk with the ``finish_reason`` is held until the usage-only chunk that follows it (or ``[DONE]``), so the
    last TGI event carries the exact counts."""

    __slots__ = (
        "_cached",
        "_completion",
        "_finish",
        "_full",
        "_held",
        "_index",
        "_inputs",
        "_prompt",
        "_seed",
        "_texts",
    )  # fmt: skip

    def __init__(self, body: dict[str, Any], backend: str) -> None:
        super().__init__(backend)
        params = body.get("parameters") or {}
        self._inputs = str(body.get("inputs", ""))
        self._full = bool(params.get("return_full_text"))
        self._seed = params.get("seed")
        self._index = 0
        self._texts: list[str] = []
        self._held: Event | None = None
        self._finish: str | None = None
        self._prompt: int | None = None
        self._completion: int | None = None
        self._cached: int | None = None

    def _usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self._prompt = usage.get("prompt_tokens", self._prompt)
            self._completion = usage.get("completion_tokens", self._completion)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                self._cached = details["cached_tokens"]

    def chunk(self, chunk: Event, out: list[Event]) -> None:
        self._usage(chunk.get("usage"))
        for choice in chunk.get("choices") or ():
            text = choice.get("text") or ""
            self._index += 1
            self._texts.append(text)
            event: Event = {
                "index": self._index,
                "token": {"id": 0, "text": text, "logprob": _logprob(choice), "special": False},
                "generated_text": None,
                "details": None,
            }
            tops = _top_tokens(choice)
            if tops:
                event["top_tokens"] = tops
            reason = choice.get("finish_reason")
            if reason == "abort":
                out.append({"error": "Request failed during generation: aborted by vLLM", "error_type": "generation"})
                continue
            if reason:
                out.extend(self.close())
                self._finish = finish_reason(reason, choice.get("stop_reason"))
                self._held = event
            else:
                out.append(event)
        if not chunk.get("choices") and self._held is not None:
            out.extend(self.close())  # the usage-only chunk: the held last token goes out with the counts

    def close(self) -> list[Event]:
        held, self._held = self._held, None
        if held is None:
            return []
        text = "".join(self._texts)
        held["generated_text"] = self._inputs + text if self._full else text
        held["details"] = {
            "finish_reason": self._finish or "length",
            "generated_tokens": self._completion if self._completion is not None else self._index,
            "seed": self._seed,
            "input_length": self._prompt if self._prompt is not None else 0,
        }
        if self._cached is not None:
            held[CACHED_TOKENS] = self._cached
        return [held]


def _logprob(choice: dict[str, Any]) -> float | None:
    logprobs = choice.get("logprobs")
    if isinstance(logprobs, dict):
        values = logprobs.get("token_logprobs") or []
        if values and isinstance(values[0], int | float):
            return float(values[0])
    return None


def _top_tokens(choice: dict[str, Any]) -> list[dict[str, Any]]:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    tops = logprobs.get("top_logprobs") or []
    if not tops or not isinstance(tops[0], dict):
        return []
    ranked = sorted(tops[0].items(), key=lambda kv: -kv[1])
    return [{"id": 0, "text": t, "logprob": lp, "special": False} for t, lp in ranked]


class Vllm(Engine):
    name = "vllm"

    async def describe(self, backend: BackendLike) -> dict[str, Any] | None:
        status, version = await backend.get_json("/version")
        if status != 200 or not isinstance(version, dict) or "version" not in version:
            return None
        status, models = await backend.get_json("/v1/models")
        data = models.get("data") if status == 200 and isinstance(models, dict) else None
        if not data or not isinstance(data[0], dict):
            return None
        card = data[0]
        max_len = int(card.get("max_model_len") or 0)
        return {
            "model_id": card.get("id", ""),
            "max_total_tokens": max_len,
            "max_input_tokens": max(max_len - 1, 0),
            "router": "vllm",
            "version": str(version["version"]),
            "engine": self.name,
        }

    def upstream(self, route: str, body: dict[str, Any], info: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        if route in OPENAI_ROUTES:
            model = body.get("model")
            out = {**body, "model": served_model(info) if model in (None, "", "tgi") else model}
            out["stream_options"] = {"include_usage": True}
            return route, out
        return COMPLETIONS_ROUTE, completion_body(body, served_model(info))

    def reader(self, route: str, body: dict[str, Any], backend: str) -> EventReader:
        if route in OPENAI_ROUTES:
            return OpenAIPassthrough(route, backend)
        return CompletionsToTgi(body, backend)

    def error(self, status: int, body: object, backend: str) -> GatewayError:
        return map_error(status, body, backend, self.name)

    def token_limit(self, message: str) -> tuple[int, int] | None:
        m = _TOO_LARGE.search(message)
        return (int(m.group(2)), int(m.group(3))) if m else None

    async def tokenize(
        self, backend: BackendLike, text: str, options: dict[str, Any], info: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """vLLM's ``/tokenize`` (ids and, with ``return_token_strs``, the tokenizer's pieces); offsets are not
        reported: each piece's are computed from the decoded text where the pieces spell it, else 0."""
        request: dict[str, Any] = {"model": served_model(info), "prompt": text, "return_token_strs": True}
        if "add_special_tokens" in options:
            request["add_special_tokens"] = options["add_special_tokens"]
        answer = await backend.post_json("/tokenize", request)
        ids = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(ids, list):
            raise BackendError("a vLLM backend answered /tokenize without tokens")
        strs = answer.get("token_strs") or [""] * len(ids)
        out = []
        offset = 0
        raw = text.encode("utf-8")
        for token_id, piece in zip(ids, strs, strict=False):
            piece = piece or ""
            encoded = piece.encode("utf-8")
            if encoded and raw.startswith(encoded, offset):
                start, offset = offset, offset + len(encoded)
                out.append({"id": token_id, "text": piece, "start": start, "stop": offset})
            else:
                out.append({"id": token_id, "text": piece, "start": 0, "stop": 0})
        return out

    async def count_chat(self, backend: BackendLike, body: dict[str, Any], info: dict[str, Any] | None) -> int:
        request = {"model": served_model(info), "messages": body.get("messages", [])}
        answer = await backend.post_json("/tokenize", request)
        count = answer.get("count") if isinstance(answer, dict) else None
        if not isinstance(count, int):
            raise BackendError("a vLLM backend answered /tokenize without count")
        return count
