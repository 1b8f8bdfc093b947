"""Simulated vLLM and SGLang servers: their HTTP APIs over the same simulated engine and GPU as the simulated TGI.

``SimTGI(SimConfig(engine="vllm" | "sglang"))`` serves the engine's own routes instead of TGI's (``/sim/*`` stays):

- **vLLM** (vllm/entrypoints/openai/api_server.py, v0.10): ``GET /health`` (200, empty), ``GET /version``,
  ``GET /v1/models`` (the served model with ``max_model_len``), ``POST /tokenize`` (``prompt`` or ``messages``;
  ``count``, ``max_model_len``, ``tokens``, ``token_strs`` when asked), ``POST /v1/completions`` and
  ``POST /v1/chat/completions`` (streamed as ``data: {json}\\n\\n`` chunks, ``stream_options.include_usage`` adding a
  usage-only chunk and ``continuous_usage_stats`` a usage on every chunk, ``data: [DONE]`` last), ``GET /metrics``
  (``vllm:*``). Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 for what the client got wrong
  (the context-length message as vLLM words it), 404 for an unknown model; an error met while streaming is the same
  object as an event. No 429: past its batch, vLLM queues (so does this simulator).
- **SGLang** (python/sglang/srt/entrypoints/http_server.py, v0.5): ``GET /health``, ``GET /health_generate``,
  ``GET /get_model_info``, ``GET /get_server_info``, ``GET /v1/models``, ``POST /tokenize``, the native
  ``POST /generate`` (streamed events ``{"text": <text so far>, "output_ids", "meta_info": {"id",
  "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"}}``, then ``data: [DONE]``),
  the same OpenAI routes (``matched_stop`` where vLLM says ``stop_reason``), ``GET /metrics`` (``sglang:*``). Errors
  are ``{"error": {"message"}}`` (400), in the stream too.

Both have the engines' automatic prefix cache (``sim.prefix_cache``; ``--no-prefix-caching`` turns it off): the hit
is reported as ``usage.prompt_tokens_details.cached_tokens`` (vLLM sends it only when started with
``--enable-prompt-tokens-details``; the simulator always does) and as ``meta_info.cached_tokens`` (SGLang), and the
prefill step computes, and the truth charges, only the rest of the prompt.

Simplifications, said here once: the chat template is the TGI simulator's (messages joined by newlines); the
sampling parameters the engine has and TGI lacks (``min_p``, ``stop_token_ids``, guided decoding) are accepted and
do not change the simulated text; ``n`` must be 1.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sim import tokenizer, wire
from sim.generation import generated_text
from sim.infer import InferError, StreamBatch
from sim.openai import chat_template
from sim.scheduler import SimRequest
from sim.tokenizer import VOCAB
from sim.validation import GenerateParameters, GenerateRequest, ValidationError, validate

if TYPE_CHECKING:
    from sim.server import SimTGI

VLLM_VERSION = "0.10.1.1"
SGLANG_VERSION = "0.5.2"
ENGINES = ("tgi", "vllm", "sglang")


class EngineError(Exception):
    """An error answer of the simulated engine: HTTP status and message."""

    def __init__(self, status: int, message: str, kind: str = "BadRequestError") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


def _dumps_sse(obj: Any) -> bytes:
    """FastAPI/Starlette SSE as vLLM and SGLang frame it: ``data: <json>\\n\\n`` (a space after the colon)."""
    return b"data: " + wire.dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class Dialect:
    """What differs between the two engines' answers."""

    def __init__(self, engine: str) -> None:
        self.engine = engine

    def error_body(self, e: EngineError) -> dict[str, Any]:
        if self.engine == "vllm":
            return {"error": {"message": e.message, "type": e.kind, "param": None, "code": e.status}}
        return {"error": {"message": e.message}}

    def context_error(self, limit: int, input_tokens: int, max_tokens: int) -> EngineError:
        if self.engine == "vllm":  # serving_engine.py _validate_input
            if input_tokens >= limit:
                return EngineError(
                    400,
                    f"This model's maximum context length is {limit} tokens. However, your request has "
                    f"{input_tokens} input tokens. Please reduce the length of the input messages.",
                )
            return EngineError(
                400,
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
                f"length is {limit} tokens and your request has {input_tokens} input tokens "
                f"({max_tokens} > {limit} - {input_tokens}).",
            )
        if input_tokens >= limit:  # tokenizer_manager.py _validate_one_request
            return EngineError(
                400, f"The input ({input_tokens} tokens) is longer than the model's context length ({limit} tokens)."
            )
        return EngineError(
            400,
            f"Requested token count exceeds the model's maximum context length of {limit} tokens. You requested a "
            f"total of {input_tokens + max_tokens} tokens: {input_tokens} tokens from the input messages and "
            f"{max_tokens} tokens for the completion. Please reduce the number of tokens in the input messages or "
            f"the completion to fit within the limit.",
        )

    def matched_key(self) -> str:
        return "stop_reason" if self.engine == "vllm" else "matched_stop"


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=wire.dumps(body), status=status, content_type="application/json")


def _number(doc: Mapping[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = doc.get(name)
    if value is None:
        return default
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    raise EngineError(400, f"{name}: Input should be a valid {kind.__name__}")


def _stops(doc: Mapping[str, Any]) -> tuple[str, ...]:
    stop = doc.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return tuple(stop)
    raise EngineError(400, "stop: Input should be a valid string or list of strings")


def _matched(sim: SimRequest) -> str | None:
    """The stop sequence that ended ``sim`` (None: EOS or length)."""
    if sim.finish_reason != "stop_sequence":
        return None
    text = generated_text(sim.tokens)
    found = [s for s in sim.valid.stop if text.endswith(s)]
    return max(found, key=len) if found else None


class EngineRequest:
    """One generation as the engine's route read it, ready for the simulated engine."""

    def __init__(
        self,
        inputs: str,
        sampling: Mapping[str, Any],
        *,
        add_special_tokens: bool,
        keep_stop: bool,
        limit: int,
        context_error: Callable[[int, int, int], EngineError],
    ) -> None:
        self.inputs = inputs
        self.keep_stop = keep_stop
        temperature = _number(sampling, "temperature", float, 1.0)
        if temperature < 0:
            raise EngineError(400, f"temperature must be non-negative, got {temperature}.")
        top_p = _number(sampling, "top_p", float)
        if top_p is not None and not 0 < top_p <= 1:
            raise EngineError(400, f"top_p must be in (0, 1], got {top_p}.")
        top_k = _number(sampling, "top_k", int)
        max_tokens = _number(sampling, "max_tokens", int)
        if max_tokens is not None and max_tokens < 1:
            raise EngineError(400, f"max_tokens must be at least 1, got {max_tokens}.")
        self.input_tokens = tokenizer.count_tokens(inputs, add_special_tokens)
        if max_tokens is None:
            max_tokens = max(limit - self.input_tokens, 1)
        if self.input_tokens >= limit or self.input_tokens + max_tokens > limit:
            raise context_error(limit, self.input_tokens, max_tokens)
        self.max_tokens = max_tokens
        greedy = temperature == 0.0
        self.request = GenerateRequest(
            inputs=inputs,
            parameters=GenerateParameters(
                temperature=None if greedy else temperature,
                top_p=None if greedy or top_p is None or top_p >= 1.0 else top_p,
                top_k=None if greedy or top_k in (None, -1, 0) else top_k,
                do_sample=not greedy,
                max_new_tokens=max_tokens,
                stop=_stops(sampling),
                seed=_number(sampling, "seed", int),
                repetition_penalty=_number(sampling, "repetition_penalty", float),
                details=True,
            ),
            add_special_tokens=add_special_tokens,
        )


class EngineRoutes:
    """The routes of one simulated engine (vLLM or SGLang) on a ``SimTGI``."""

    def __init__(self, tgi: SimTGI, engine: str) -> None:
        self.tgi = tgi
        self.dialect = Dialect(engine)
        self.engine = engine
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0

    @property
    def limit(self) -> int:
        return self.tgi.config.max_total_tokens

    @property
    def model(self) -> str:
        return self.tgi.config.model_id

    def add_to(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/metrics", self.metrics)
        if self.engine == "vllm":
            app.router.add_get("/version", self.version)
        else:
            app.router.add_get("/health_generate", self.health)
            app.router.add_get("/get_model_info", self.model_info)
            app.router.add_get("/get_server_info", self.server_info)
            app.router.add_post("/generate", self.generate)

    # --- plumbing ---

    def error(self, e: EngineError) -> web.Response:
        return _json(self.dialect.error_body(e), status=e.status)

    def request(
        self, inputs: str, sampling: Mapping[str, Any], *, add_special_tokens: bool, keep_stop: bool
    ) -> EngineRequest:
        return EngineRequest(
            inputs,
            sampling,
            add_special_tokens=add_special_tokens,
            keep_stop=keep_stop,
            limit=self.limit,
            context_error=self.dialect.context_error,
        )

    async def body(self, request: web.Request) -> dict[str, Any]:
        try:
            doc = await request.json()
        except ValueError:
            raise EngineError(400, "JSON decode error") from None
        if not isinstance(doc, dict):
            raise EngineError(400, "Input should be a valid dictionary or object")
        return doc

    def check_model(self, doc: Mapping[str, Any]) -> None:
        model = doc.get("model")
        if self.engine == "vllm" and model not in (None, self.model):
            raise EngineError(404, f"The model `{model}` does not exist.", "NotFoundError")

    async def run(self, req: EngineRequest, request_id: str) -> AsyncGenerator[tuple[StreamBatch, list[str]], None]:
        """The engine's token batches, each with its tokens' texts (the stop string trimmed when not kept)."""
        try:
            validate(req.request, self.tgi.config)
        except ValidationError as e:
            raise EngineError(400, e.message) from None
        self.tgi.metrics.request_received()
        gen = self.tgi.infer.generate_stream(req.request, request_id)
        try:
            async for batch in gen:
                if not batch.tokens:
                    continue
                texts = ["" if VOCAB[i].special else VOCAB[i].text for i in batch.tokens]
                if batch.end:
                    sim = batch.request
                    matched = _matched(sim)
                    if matched and not req.keep_stop and texts[-1].endswith(matched):
                        texts[-1] = texts[-1][: -len(matched)]
                    self.prompt_tokens_total += sim.valid.input_length
                    self.generation_tokens_total += len(sim.tokens)
                    self.tgi.metrics.success(sim.valid.input_length, len(sim.tokens))
                yield batch, texts
        finally:
            await gen.aclose()

    async def sse(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        return response

    # --- small routes ---

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200 if self.tgi.healthy else 503)

    async def version(self, request: web.Request) -> web.StreamResponse:
        return _json({"version": VLLM_VERSION})

    async def models(self, request: web.Request) -> web.StreamResponse:
        card: dict[str, Any] = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": self.engine,
            "root": self.model,
            "parent": None,
            "max_model_len": self.limit,
        }
        return _json({"object": "list", "data": [card]})

    async def model_info(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "model_path": self.model,
                "tokenizer_path": self.model,
                "is_generation": True,
                "preferred_sampling_params": None,
                "weight_version": "default",
            }
        )

    async def server_info(self, request: web.Request) -> web.StreamResponse:
        c = self.tgi.config
        return _json(
            {
                "model_path": self.model,
                "served_model_name": self.model,
                "context_length": c.max_total_tokens,
                "max_running_requests": c.max_concurrent_requests,
                "max_total_num_tokens": c.max_batch_total_tokens,
                "chunked_prefill_size": c.max_batch_prefill_tokens,
                "version": SGLANG_VERSION,
            }
        )

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        try:
            doc = await self.body(request)
            self.check_model(doc)
            add_special = _number(doc, "add_special_tokens", bool, True)
            if "messages" in doc:
                text = chat_template(doc["messages"])
                add_special = False
            elif isinstance(doc.get("prompt"), str):
                text = doc["prompt"]
            else:
                raise EngineError(400, "prompt: Field required")
        except EngineError as e:
            return self.error(e)
        except Exception as e:  # a malformed message list
            return self.error(EngineError(400, str(e)))
        spans = tokenizer.encode(text, add_special)
        out: dict[str, Any] = {"count": len(spans), "max_model_len": self.limit, "tokens": [t.id for t in spans]}
        if self.engine == "vllm" and doc.get("return_token_strs"):
            out["token_strs"] = [t.text for t in spans]
        return _json(out)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        scheduler = self.tgi.scheduler
        prefix = f"{self.engine}:"
        running, waiting = scheduler.core.batch_size, scheduler.core.queue_size
        names = (
            ("num_requests_running", "num_running_reqs"),
            ("num_requests_waiting", "num_queue_reqs"),
        )
        (run_name, wait_name) = (n[0] if self.engine == "vllm" else n[1] for n in names)
        lines = [
            f"# TYPE {prefix}{run_name} gauge",
            f'{prefix}{run_name}{{model_name="{self.model}"}} {running}',
            f"# TYPE {prefix}{wait_name} gauge",
            f'{prefix}{wait_name}{{model_name="{self.model}"}} {waiting}',
            f"# TYPE {prefix}prompt_tokens_total counter",
            f'{prefix}prompt_tokens_total{{model_name="{self.model}"}} {self.prompt_tokens_total}',
            f"# TYPE {prefix}generation_tokens_total counter",
            f'{prefix}generation_tokens_total{{model_name="{self.model}"}} {self.generation_tokens_total}',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # --- SGLang's native /generate ---

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            doc = await self.body(request)
            if not isinstance(doc.get("text"), str):
                raise EngineError(400, "text: only a single string prompt is simulated")
            sp = doc.get("sampling_params") or {}
            if not isinstance(sp, dict):
                raise EngineError(400, "sampling_params: Input should be a valid dictionary")
            sampling = {**sp, "max_tokens": sp.get("max_new_tokens", 128)}
            keep_stop = bool(sp.get("no_stop_trim", False))
            req = self.request(doc["text"], sampling, add_special_tokens=True, keep_stop=keep_stop)
            stream = bool(doc.get("stream", False))
        except EngineError as e:
            return self.error(e)
        request_id = self.tgi.request_id(request)
        rid = str(doc.get("rid") or request_id)
        started = time.monotonic()
        text: list[str] = []
        ids: list[int] = []

        def event(sim: SimRequest, end: bool) -> dict[str, Any]:
            finish: dict[str, Any] | None = None
            if end:
                matched = _matched(sim)
                if sim.finish_reason == "length":
                    finish = {"type": "length", "length": sim.valid.max_new_tokens}
                else:
                    finish = {"type": "stop", "matched": matched if matched else tokenizer.EOS_ID}
            return {
                "text": "".join(text),
                "output_ids": list(ids),
                "meta_info": {
                    "id": rid,
                    "finish_reason": finish,
                    "prompt_tokens": sim.valid.input_length,
                    "completion_tokens": len(ids),
                    "cached_tokens": sim.cached_tokens,
                    "e2e_latency": time.monotonic() - started,
                },
            }

        if not stream:
            last: dict[str, Any] | None = None
            try:
                async for batch, texts in self.run(req, request_id):
                    text.extend(texts)
                    ids.extend(VOCAB[i].id for i in batch.tokens)
                    last = event(batch.request, batch.end)
            except EngineError as e:
                return self.error(e)
            except InferError as e:
                return self.error(EngineError(500, e.message, "InternalServerError"))
            return _json(last)
        try:
            gen = self.run(req, request_id)
            first = await anext(gen, None)
        except EngineError as e:
            return self.error(e)
        except InferError as e:
            return self.error(EngineError(500, e.message, "InternalServerError"))
        response = await self.sse(request)
        try:
            item = first
            while item is not None:
                batch, texts = item
                text.extend(texts)
                ids.extend(VOCAB[i].id for i in batch.tokens)
                await response.write(_dumps_sse(event(batch.request, batch.end)))
                item = await anext(gen, None)
        except InferError as e:
            await response.write(_dumps_sse({"error": {"message": e.message}}))
        except ConnectionResetError:
            await gen.aclose()
            return response
        await response.write(SSE_DONE)
        return response

    # --- the OpenAI routes ---

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            doc = await self.body(request)
            self.check_model(doc)
            prompt = doc.get("prompt")
            if not isinstance(prompt, str):
                raise EngineError(400, "prompt: only a single string prompt is simulated")
            if doc.get("n", 1) != 1:
                raise EngineError(400, "n: only n=1 is simulated")
            sampling = {**doc, "max_tokens": doc.get("max_tokens", 16)}
            add_special = _number(doc, "add_special_tokens", bool, True)
            keep_stop = bool(doc.get("include_stop_str_in_output", False)) or bool(doc.get("no_stop_trim", False))
            req = self.request(prompt, sampling, add_special_tokens=add_special, keep_stop=keep_stop)
        except EngineError as e:
            return self.error(e)
        return await self._openai(request, doc, req, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            doc = await self.body(request)
            self.check_model(doc)
            if not isinstance(doc.get("messages"), list):
                raise EngineError(400, "messages: Field required")
            try:
                inputs = chat_template(doc["messages"])
            except Exception as e:
                raise EngineError(400, f"messages: {e}") from None
            max_tokens = doc.get("max_completion_tokens", doc.get("max_tokens"))
            sampling = {**doc, "max_tokens": max_tokens}
            req = self.request(inputs, sampling, add_special_tokens=False, keep_stop=False)
        except EngineError as e:
            return self.error(e)
        return await self._openai(request, doc, req, chat=True)

    async def _openai(
        self, request: web.Request, doc: Mapping[str, Any], req: EngineRequest, *, chat: bool
    ) -> web.StreamResponse:
        request_id = self.tgi.request_id(request)
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        cid = ("chatcmpl-" if chat else "cmpl-") + request_id
        model = str(doc.get("model") or self.model)
        options = doc.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
        continuous = bool(options.get("continuous_usage_stats")) if isinstance(options, dict) else False
        key = self.dialect.matched_key()
        state = {"generated": 0}

        def usage(sim: SimRequest) -> dict[str, Any]:
            p, c = sim.valid.input_length, len(sim.tokens) if sim.done else state["generated"]
            out: dict[str, Any] = {"prompt_tokens": p, "total_tokens": p + c, "completion_tokens": c}
            if self.tgi.config.prefix_caching:  # vLLM: with --enable-prompt-tokens-details; SGLang: always
                out["prompt_tokens_details"] = {"cached_tokens": sim.cached_tokens}
            return out

        def finish(sim: SimRequest) -> tuple[str, str | int | None]:
            if sim.finish_reason == "length":
                return "length", None
            return "stop", _matched(sim)

        if not doc.get("stream"):
            texts: list[str] = []
            sim: SimRequest | None = None
            try:
                async for batch, parts in self.run(req, request_id):
                    texts.extend(parts)
                    sim = batch.request
            except EngineError as e:
                return self.error(e)
            except InferError as e:
                return self.error(EngineError(500, e.message, "InternalServerError"))
            assert sim is not None
            reason, matched = finish(sim)
            choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason, key: matched}
            if chat:
                choice["message"] = {"role": "assistant", "content": "".join(texts)}
            else:
                choice["text"] = "".join(texts)
            body = {"id": cid, "object": kind, "created": created, "model": model, "choices": [choice]}
            body["usage"] = usage(sim)
            return _json(body)

        try:
            gen = self.run(req, request_id)
            first = await anext(gen, None)
        except EngineError as e:
            return self.error(e)
        except InferError as e:
            return self.error(EngineError(500, e.message, "InternalServerError"))
        response = await self.sse(request)

        def chunk(sim: SimRequest, text: str, reason: str | None, matched: Any) -> bytes:
            c: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason, key: matched}
            if chat:
                c["delta"] = {"content": text}
            else:
                c["text"] = text
            body: dict[str, Any] = {"id": cid, "object": chunk_kind, "created": created, "model": model}
            body["choices"] = [c]
            body["usage"] = usage(sim) if continuous else None
            return _dumps_sse(body)

        try:
            if chat and first is not None:
                role = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                role["finish_reason"] = None
                head = {"id": cid, "object": chunk_kind, "created": created, "model": model, "choices": [role]}
                await response.write(_dumps_sse(head))
            item = first
            current: SimRequest | None = None
            while item is not None:
                batch, parts = item
                current = batch.request
                out = []
                for k, text in enumerate(parts):
                    state["generated"] += 1
                    ends: tuple[str | None, Any] = (None, None)
                    if batch.end and k == len(parts) - 1:
                        ends = finish(current)
                    out.append(chunk(current, text, *ends))
                await response.write(b"".join(out))
                item = await anext(gen, None)
            if include_usage and current is not None:
                body = {"id": cid, "object": chunk_kind, "created": created, "model": model, "choices": []}
                body["usage"] = usage(current)
                await response.write(_dumps_sse(body))
        except InferError as e:
            await response.write(
                _dumps_sse(self.dialect.error_body(EngineError(500, e.message, "InternalServerError")))
            )
        except ConnectionResetError:
            await gen.aclose()
            return response
        await response.write(SSE_DONE)
        return response
