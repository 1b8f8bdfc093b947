"""SGLang's HTTP server (python/sglang/srt/entrypoints/http_server.py, followed at v0.5).

Identified by ``GET /get_model_info`` (``model_path``); ``/v1/models`` names the served model and its
``max_model_len``; ``/get_server_info`` tells ``max_running_requests`` and the version when it is there.

- TGI and TGIS requests go to SGLang's native ``POST /generate`` streamed: ``{"text", "sampling_params", "stream"}``.
  Its events carry ``meta_info`` with ``prompt_tokens`` from the first chunk on (the prompt's count is known with
  the first token), ``completion_tokens``, ``cached_tokens`` (the prefix-cache hit) and ``finish_reason``
  (``{"type": "stop"|"length"|"abort", "matched": <stop string or token id>}``); ``text`` is the text so far
  (SGLang's default, non-incremental streaming), so each event's new text is its difference from the last.
  ``no_stop_trim`` keeps the stop sequence in the text, as TGI does. TGI's ``truncate``, ``top_n_tokens``,
  ``typical_p``, ``best_of`` and ``watermark`` have no equivalent on this route: INVALID_ARGUMENT.
- The OpenAI routes go to SGLang's own, the model renamed to the served one and the usage asked for.
- Errors: ``{"error": {"message"}}`` with 400 (validation) or in the stream; a context-length refusal ("Requested
  token count exceeds the model's maximum context length of N tokens. You requested a total of T tokens: I tokens
  from the input messages and M tokens for the completion.") is read for TGIS's TOKEN_LIMIT semantics.
"""

from __future__ import annotations

import json
import re
from typing import Any

from common.errors import BackendError, GatewayError, InvalidArgument
from proxy.engines.base import CACHED_TOKENS, BackendLike, Engine, Event, EventReader, served_model
from proxy.engines.openai_compat import (
    OPENAI_ROUTES,
    ChunkReader,
    OpenAIPassthrough,
    map_error,
    sampling,
)

GENERATE_ROUTE = "/generate"
_TOO_LONG = re.compile(
    r"maximum context length of (\d+) tokens\. You requested a total of \d+ tokens: (\d+) tokens from the input"
)


def generate_body(body: dict[str, Any]) -> dict[str, Any]:
    """A TGI ``/generate_stream`` body as SGLang's streamed native ``/generate`` request."""
    params = dict(body.get("parameters") or {})
    for name in ("truncate", "top_n_tokens"):
        if params.get(name):
            raise InvalidArgument(
                f"Input validation error: `{name}` is not supported by this backend's engine (SGLang)"
            )
    mapped = sampling(params)
    sp: dict[str, Any] = {"no_stop_trim": True}
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty"):
        if name in mapped:
            sp[name] = mapped[name]
    if "seed" in mapped:
        sp["sampling_seed"] = mapped["seed"]
    if params.get("max_new_tokens") is not None:
        sp["max_new_tokens"] = params["max_new_tokens"]
    if params.get("stop"):
        sp["stop"] = list(params["stop"])
    grammar = params.get("grammar")
    if isinstance(grammar, dict):
        if grammar.get("type") == "json":
            sp["json_schema"] = json.dumps(grammar.get("value"))
        elif grammar.get("type") == "regex":
            sp["regex"] = grammar.get("value")
        else:
            raise InvalidArgument(f"Input validation error: `grammar.type`: {grammar.get('type')!r} is not supported")
    out: dict[str, Any] = {"text": body.get("inputs", ""), "sampling_params": sp, "stream": True}
    if params.get("adapter_id"):
        out["lora_path"] = params["adapter_id"]
    return out


def _finish(meta: dict[str, Any]) -> tuple[str | None, str | None]:
    """(TGI finish reason, abort message) of SGLang's ``meta_info.finish_reason``."""
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict):
        return None, None
    kind = reason.get("type")
    if kind == "length":
        return "length", None
    if kind == "stop":
        return ("stop_sequence" if isinstance(reason.get("matched"), str) else "eos_token"), None
    return None, str(reason.get("message") or "aborted by SGLang")


class GenerateToTgi(ChunkReader):
    """SGLang's ``/generate`` events as TGI's ``/generate_stream`` events (one per SGLang event that adds text)."""

    __slots__ = ("_full", "_index", "_inputs", "_seed", "_text", "cached_tokens")

    def __init__(self, body: dict[str, Any], backend: str) -> None:
        super().__init__(backend)
        params = body.get("parameters") or {}
        self._inputs = str(body.get("inputs", ""))
        self._full = bool(params.get("return_full_text"))
        self._seed = params.get("seed")
        self._index = 0
        self._text = ""
        self.cached_tokens: int | None = None

    def chunk(self, chunk: Event, out: list[Event]) -> None:
        meta = chunk.get("meta_info") or {}
        text = str(chunk.get("text") or "")
        delta = text[len(self._text) :] if text.startswith(self._text) else text
        self._text = text if text.startswith(self._text) else self._text + text
        if isinstance(meta.get("cached_tokens"), int):
            self.cached_tokens = meta["cached_tokens"]
        reason, aborted = _finish(meta)
        if aborted is not None:
            out.append({"error": f"Request failed during generation: {aborted}", "error_type": "generation"})
            return
        if not delta and reason is None:
            return
        self._index += 1
        event: Event = {
            "index": self._index,
            "token": {"id": _last_id(chunk), "text": delta, "logprob": None, "special": False},
            "generated_text": None,
            "details": None,
        }
        if reason is not None:
            event["generated_text"] = self._inputs + self._text if self._full else self._text
            event["details"] = {
                "finish_reason": reason,
                "generated_tokens": int(meta.get("completion_tokens") or self._index),
                "seed": self._seed,
                "input_length": int(meta.get("prompt_tokens") or 0),
            }
            if self.cached_tokens is not None:
                event[CACHED_TOKENS] = self.cached_tokens
        out.append(event)


def _last_id(chunk: dict[str, Any]) -> int:
    ids = chunk.get("output_ids")
    return int(ids[-1]) if isinstance(ids, list) and ids and isinstance(ids[-1], int) else 0


class Sglang(Engine):
    name = "sglang"

    async def describe(self, backend: BackendLike) -> dict[str, Any] | None:
        status, model_info = await backend.get_json("/get_model_info")
        if status != 200 or not isinstance(model_info, dict) or "model_path" not in model_info:
            return None
        status, models = await backend.get_json("/v1/models")
        data = models.get("data") if status == 200 and isinstance(models, dict) else None
        card = data[0] if data and isinstance(data[0], dict) else {}
        max_len = int(card.get("max_model_len") or 0)
        info: dict[str, Any] = {
            "model_id": card.get("id") or model_info["model_path"],
            "max_total_tokens": max_len,
            "max_input_tokens": max(max_len - 1, 0),
            "router": "sglang",
            "version": "",
            "engine": self.name,
        }
        status, server = await backend.get_json("/get_server_info")
        if status == 200 and isinstance(server, dict):
            info["version"] = str(server.get("version") or "")
            if isinstance(server.get("max_running_requests"), int):
                info["max_concurrent_requests"] = server["max_running_requests"]
            if not max_len and isinstance(server.get("context_length"), int):
                info["max_total_tokens"] = server["context_length"]
                info["max_input_tokens"] = server["context_length"] - 1
        return info

    def upstream(self, route: str, body: dict[str, Any], info: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        if route in OPENAI_ROUTES:
            model = body.get("model")
            out = {**body, "model": served_model(info) if model in (None, "", "tgi") else model}
            out["stream_options"] = {"include_usage": True}
            return route, out
        return GENERATE_ROUTE, generate_body(body)

    def reader(self, route: str, body: dict[str, Any], backend: str) -> EventReader:
        if route in OPENAI_ROUTES:
            return OpenAIPassthrough(route, backend)
        return GenerateToTgi(body, backend)

    def error(self, status: int, body: object, backend: str) -> GatewayError:
        return map_error(status, body, backend, self.name)

    def token_limit(self, message: str) -> tuple[int, int] | None:
        m = _TOO_LONG.search(message)
        return (int(m.group(1)), int(m.group(2))) if m else None

    async def tokenize(
        self, backend: BackendLike, text: str, options: dict[str, Any], info: dict[str, Any] | None
    ) -> list[dict[str, Any]]:
        """SGLang's ``/tokenize`` (token ids; no texts, no offsets)."""
        request: dict[str, Any] = {"model": served_model(info), "prompt": text}
        if "add_special_tokens" in options:
            request["add_special_tokens"] = options["add_special_tokens"]
        answer = await backend.post_json("/tokenize", request)
        ids = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(ids, list):
            raise BackendError("an SGLang backend answered /tokenize without tokens")
        return [{"id": i, "text": "", "start": 0, "stop": 0} for i in ids]

    async def count_chat(self, backend: BackendLike, body: dict[str, Any], info: dict[str, Any] | None) -> int:
        raise BackendError("SGLang has no route that counts a chat request's tokens without generating")
