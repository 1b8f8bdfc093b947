"""A TGI-API HTTP server over a random-init Llama: a real GPU workload for the gateway where the TGI container cannot
run (no Docker, no downloads).

    python -m bench.gpu.reference_backend --port 3000                  # Llama-3-8B-shaped, bf16, on cuda
    python -m bench.gpu.reference_backend --port 3000 --dtype fp8      # the same with fp8 transformer layers
    python -m bench.gpu.reference_backend --port 3000 --engine cb      # the fallback: transformers' manager
    python -m bench.gpu.reference_backend --port 3000 --tiny --device cpu   # a tiny model, for tests

Two engines behind one ``Engine`` interface: ``graph`` (the default, ``graph_engine.GraphEngine``: a static KV cache,
batched prefill and CUDA-graph decode steps, GPU-bound like TGI) and ``cb`` (``reference_engine.CBEngine``:
transformers' continuous-batching manager, CPU-bound on a GPU, kept as a fallback and for comparison).

Routes, with TGI 3.x's wire format (mirroring ``sim/``, whose format is TGI-exact):

- ``POST /generate_stream``: SSE, ``data:{StreamResponse}\\n\\n`` per token, stream indices from 1; the last event
  carries ``generated_text`` and, with ``details``, ``{finish_reason, generated_tokens, seed, input_length}``.
  Errors (validation, overload, generation) arrive in-stream with HTTP 200 as ``{"error", "error_type"}``, as in TGI.
- ``POST /generate`` (and ``POST /`` with ``stream``): one JSON answer; 422 validation, 429 overloaded, 424
  generation error; TGI's ``x-*`` timing headers.
- ``POST /tokenize``, ``GET /info``, ``GET /health`` (503 once the engine died), and ``GET /reference/stats`` (JSON
  counters for tests and benchmarks; not a TGI route).

Admission follows TGI: a permit of ``max_concurrent_requests`` is tried before validation, never awaited; past the
limit the answer is "Model is overloaded" at once. Validation is ``sim.validation`` (TGI's checks, order and
messages) with the token counts of ``bench.gpu.reference_tokenizer``.

Generation is greedy on random weights: sampling parameters are validated and the seed is reported as TGI reports
it, but do not change the output; ``top_n_tokens`` gives no top tokens; ``decoder_input_details`` gives the prompt
tokens with null logprobs; ``best_of`` must be 1. EOS is off unless ``--allow-eos``: a random model would otherwise
stop at arbitrary points, and a benchmark needs exactly ``max_new_tokens``. Stop sequences work (the engine's request
is cancelled at the match). A client that disconnects cancels its request in the engine, so the GPU stops working
for it within a step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import json
import math
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web

from bench.gpu.graph_engine import GraphEngineConfig
from bench.gpu.reference_engine import Engine, EngineConfig, EngineOutput, ModelShape
from bench.gpu.reference_tokenizer import WordTokenizer
from common.net import bind_tcp, http_url
from sim import wire
from sim.config import SimConfig
from sim.validation import (
    BodyRejection,
    GenerateRequest,
    ValidationError,
    ValidRequest,
    parse_generate_request,
    read_json,
    validate,
    validate_best_of,
)

log = structlog.get_logger(__name__)

TGI_VERSION = "3.3.6-dev0"  # the TGI version whose API this server speaks (tests/reference/tgi_openapi.json)
OVERLOADED = "Model is overloaded"
WATCHDOG_INTERVAL_S = 0.5
_ERROR_STATUS = {"validation": 422, "overloaded": 429, "generation": 424}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """What /info reports and validation enforces (TGI launcher names and defaults)."""

    model_id: str = "joulegate/random-llama-3-8b"
    max_concurrent_requests: int = 128
    max_input_tokens: int = 1024
    max_total_tokens: int = 2048
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    validation_workers: int = 2
    allow_eos: bool = False
    compute_type: str = "gpu+optimized"

    def validation_config(self) -> SimConfig:
        """The ``SimConfig`` that ``sim.validation.validate`` reads its limits from."""
        return SimConfig(
            model_id=self.model_id,
            max_concurrent_requests=self.max_concurrent_requests,
            max_best_of=1,
            max_stop_sequences=self.max_stop_sequences,
            max_top_n_tokens=self.max_top_n_tokens,
            max_input_tokens=self.max_input_tokens,
            max_total_tokens=self.max_total_tokens,
            max_batch_prefill_tokens=max(4096, self.max_input_tokens),
            max_batch_total_tokens=max(262_144, self.max_total_tokens),
        )


class InferError(Exception):
    """TGI's ``InferError``: ``message`` is the full text TGI sends."""

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    @property
    def status(self) -> int:
        return _ERROR_STATUS.get(self.error_type, 500)


def _generation_error(reason: str) -> InferError:
    return InferError("generation", f"Request failed during generation: Server error: {reason}")


class Live:
    """One request in the engine, seen from the event loop: tokens as they come, and when and why it ended.

    The engine reports cumulative token lists; ``on_output`` appends what is new and applies TGI's stopping rules
    in TGI's order (length, EOS, stop sequence). ``engine_done`` says the engine itself finished the request;
    a request that ends here first (stop sequence, client gone) must be cancelled in the engine.
    """

    __slots__ = (
        "_event",
        "_tail",
        "engine_done",
        "eos_id",
        "error",
        "finish_reason",
        "first_token_ns",
        "id",
        "logprobs",
        "queued_ns",
        "taken",
        "tokenizer",
        "tokens",
        "valid",
    )

    def __init__(self, request_id: str, valid: ValidRequest, tokenizer: WordTokenizer, eos_id: int | None) -> None:
        self.id = request_id
        self.valid = valid
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.tokens: list[int] = []
        self.logprobs: list[float | None] = []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.engine_done = False
        self.taken = 0
        self.queued_ns = time.time_ns()
        self.first_token_ns: int | None = None
        self._tail = ""
        self._event = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def on_output(self, out: EngineOutput) -> None:
        if out.finished or out.error is not None:
            self.engine_done = True
        if self.done:
            return
        if out.error is not None:
            self.error = out.error
            self._event.set()
            return
        if self.first_token_ns is None and out.tokens:
            self.first_token_ns = time.time_ns()
        for k in range(len(self.tokens), len(out.tokens)):
            token_id = out.tokens[k]
            self.tokens.append(token_id)
            self.logprobs.append(out.logprobs[k] if k < len(out.logprobs) else None)
            self.finish_reason = self._stop_reason(token_id)
            if self.finish_reason is not None:
                break
        if self.finish_reason is None and out.finished:
            # the engine stops only at max_new_tokens or an EOS, both caught above; say so if that ever changes
            self.error = f"the engine ended the request after {len(self.tokens)} of {self.valid.max_new_tokens} tokens"
        self._event.set()

    def fail(self, reason: str) -> None:
        if not self.done:
            self.error = reason
            self._event.set()

    def _stop_reason(self, token_id: int) -> str | None:
        if len(self.tokens) >= self.valid.max_new_tokens:
            return "length"
        if token_id == self.eos_id:
            return "eos_token"
        if self.valid.stop:
            entry = self.tokenizer.token(token_id)
            if not entry.special:
                self._tail = (self._tail + entry.text)[-300:]
                if any(self._tail.endswith(s) for s in self.valid.stop):
                    return "stop_sequence"
        return None

    async def wait(self, timeout_s: float) -> bool:
        """Wait until something new happened (True) or ``timeout_s`` passed (False)."""
        if self.taken < len(self.tokens) or self.done:
            return True
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            return False
        finally:
            self._event.clear()
        return True

    def take(self) -> tuple[int, list[int], bool]:
        """(stream index of the first, new tokens, whether the last of them ends the generation)."""
        first = self.taken
        new = self.tokens[first:]
        self.taken = len(self.tokens)
        return first + 1, new, self.finish_reason is not None

    @property
    def generated_text(self) -> str:
        text = self.tokenizer.decode(self.tokens)
        return self.valid.inputs + text if self.valid.return_full_text else text


class ReferenceServer:
    """The HTTP layer over one ``Engine``. ``await start(host, port)``, use ``url``, ``await stop()``."""

    def __init__(self, config: ServerConfig, engine: Engine, tokenizer: WordTokenizer) -> None:
        self.config = config
        self.engine = engine
        self.tokenizer = tokenizer
        self._validation_config = config.validation_config()
        self._lives: dict[str, Live] = {}
        self._ids = itertools.count(1)
        self.in_flight = 0
        self.counts = {"received": 0, "success": 0, "overloaded": 0, "validation": 0, "generation": 0, "dropped": 0}
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.engine_error: str | None = None

    # --- life cycle ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        sock = bind_tcp(host, port)
        self._url = http_url(host, sock)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/", self._compat_generate)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/generate_stream", self._generate_stream)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/", self._health)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_get("/reference/stats", self._stats)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.05)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        self._watchdog = asyncio.get_running_loop().create_task(self._watch_engine(), name="reference-watchdog")
        log.info("reference_backend_started", url=self._url, model_id=self.config.model_id)
        return self._url

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("not started")
        return self._url

    async def _watch_engine(self) -> None:
        """Fail every request in flight at once when the engine dies, instead of letting clients hang."""
        while True:
            await asyncio.sleep(WATCHDOG_INTERVAL_S)
            error = self.engine.fatal_error()
            if error is not None and self.engine_error is None:
                self.engine_error = error
                log.error("reference_engine_died", error=error, in_flight=len(self._lives))
                for live in list(self._lives.values()):
                    live.fail(error)

    def info(self) -> dict[str, Any]:
        c = self.config
        return {
            "model_id": c.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": c.max_stop_sequences,
            "max_input_tokens": c.max_input_tokens,
            "max_total_tokens": c.max_total_tokens,
            "validation_workers": c.validation_workers,
            "max_client_batch_size": c.max_client_batch_size,
            "router": "text-generation-router",
            "version": TGI_VERSION,
            "sha": None,
            "docker_label": None,
        }

    # --- admission, validation and the engine ---

    def _acquire(self) -> None:
        if self.in_flight >= self.config.max_concurrent_requests:
            self.counts["overloaded"] += 1
            raise InferError("overloaded", OVERLOADED)
        self.in_flight += 1

    def _validate(self, req: GenerateRequest) -> ValidRequest:
        try:
            return validate(req, self._validation_config)
        except ValidationError as e:
            self.counts["validation"] += 1
            raise InferError("validation", f"Input validation error: {e.message}") from None

    def _submit(self, valid: ValidRequest) -> Live:
        prompt = self.tokenizer.encode(valid.inputs, valid.add_special_tokens)[-valid.input_length :]
        eos_id = self.tokenizer.eos_id if self.config.allow_eos else None
        live = Live(f"r{next(self._ids)}", valid, self.tokenizer, eos_id)
        if self.engine_error is not None:
            raise _generation_error(self.engine_error)
        try:
            self.engine.submit(live.id, [t.id for t in prompt], valid.max_new_tokens, eos_id, live.on_output)
        except RuntimeError as e:
            raise _generation_error(str(e)) from None
        self._lives[live.id] = live
        return live

    def _finish(self, live: Live) -> None:
        """Whatever happened: cancel the engine's request if it still runs, count the outcome."""
        self._lives.pop(live.id, None)
        if not live.engine_done:
            self.engine.cancel(live.id)
        if live.error is not None:
            self.counts["generation"] += 1
        elif live.finish_reason is None:
            self.counts["dropped"] += 1
        else:
            self.counts["success"] += 1

    async def run_to_end(self, req: GenerateRequest) -> Live:
        """Admit, validate and generate one whole answer; raises ``InferError``."""
        self._acquire()
        try:
            valid = self._validate(req)
            live = self._submit(valid)
            try:
                while not live.done:
                    await live.wait(3600.0)
                    live.take()  # nobody streams these tokens: mark them seen, so that wait() blocks again
            finally:
                self._finish(live)
            if live.error is not None:
                raise _generation_error(live.error)
            return live
        finally:
            self.in_flight -= 1

    # --- routes ---

    async def _parse(self, request: web.Request, compat: bool) -> GenerateRequest:
        return parse_generate_request(read_json(await request.read(), request.headers.get("Content-Type")), compat)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generate(request, compat=False)

    async def _compat_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generate(request, compat=True)

    async def _handle_generate(self, request: web.Request, compat: bool) -> web.StreamResponse:
        t_start_ns = time.time_ns()
        try:
            req = await self._parse(request, compat)
        except BodyRejection as e:
            return _rejection(e)
        if compat and req.parameters.return_full_text is None:
            req = dataclasses.replace(req, parameters=dataclasses.replace(req.parameters, return_full_text=True))
        if compat and req.stream:
            return await self._stream(request, req)
        self.counts["received"] += 1
        p = req.parameters
        try:
            if p.best_of is not None and p.best_of != 1:
                try:
                    validate_best_of(p.best_of, self._validation_config)
                except ValidationError as e:
                    self.counts["validation"] += 1
                    raise InferError("validation", f"Input validation error: {e.message}") from None
            live = await self.run_to_end(req)
        except InferError as e:
            return _json(wire.error_body(e.message, e.error_type), status=e.status)
        body: dict[str, Any] = {"generated_text": live.generated_text}
        if p.details or p.decoder_input_details:
            body["details"] = self._details(live, p.decoder_input_details)
        headers = self._timing_headers(req.inputs, live, t_start_ns, time.time_ns())
        return _json([body] if compat else body, headers=headers)

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._parse(request, compat=False)
        except BodyRejection as e:
            return _rejection(e)
        return await self._stream(request, req)

    async def _stream(self, request: web.Request, req: GenerateRequest) -> web.StreamResponse:
        self.counts["received"] += 1
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-compute-type": self.config.compute_type,
                "x-compute-characters": str(len(req.inputs)),
                "X-Accel-Buffering": "no",
            },
        )
        await response.prepare(request)
        p = req.parameters
        try:
            if (1 if p.best_of is None else p.best_of) != 1:
                self.counts["validation"] += 1
                raise InferError(
                    "validation", "Input validation error: `best_of` != 1 is not supported when streaming tokens"
                )
            if p.decoder_input_details:
                self.counts["validation"] += 1
                raise InferError(
                    "validation",
                    "Input validation error: `decoder_input_details` == true is not supported when streaming tokens",
                )
            self._acquire()
            try:
                live = self._submit(self._validate(req))
                try:
                    await self._write_stream(response, live, p.details)
                finally:
                    self._finish(live)
            finally:
                self.in_flight -= 1
        except InferError as e:
            with contextlib.suppress(ConnectionResetError):
                await response.write(wire.sse(wire.error_body(e.message, e.error_type)))
        except ConnectionResetError:
            pass  # the client left; _finish cancelled its request in the engine
        return response

    async def _write_stream(self, response: web.StreamResponse, live: Live, details: bool) -> None:
        while True:
            if not await live.wait(wire.KEEPALIVE_INTERVAL_S):
                await response.write(wire.SSE_KEEPALIVE)
                continue
            first, tokens, end = live.take()
            if tokens:
                parts = []
                last = len(tokens) - 1
                for k, token_id in enumerate(tokens):
                    index = first + k
                    token = self._token_json(token_id, live.logprobs[index - 1])
                    if end and k == last:
                        body = {
                            "index": index,
                            "token": token,
                            "generated_text": live.generated_text,
                            "details": self._stream_details(live) if details else None,
                        }
                    else:
                        body = {"index": index, "token": token, "generated_text": None, "details": None}
                    parts.append(wire.sse(body))
                await response.write(b"".join(parts))
            if end:
                return
            if live.error is not None:
                raise _generation_error(live.error)

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._parse(request, compat=False)
        except BodyRejection as e:
            return _rejection(e)
        raw = req.inputs.encode("utf-8")
        return _json(
            [
                {"id": t.id, "text": raw[t.start : t.stop].decode("utf-8", "replace"), "start": t.start, "stop": t.stop}
                for t in self.tokenizer.encode(req.inputs, req.add_special_tokens)
            ]
        )

    async def _health(self, request: web.Request) -> web.StreamResponse:
        if self.engine_error is None and self.engine.fatal_error() is None:
            return web.Response(status=200)
        return _json(wire.error_body("unhealthy", "healthcheck"), status=503)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return _json(self.info())

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        return _json(
            {
                "in_flight": self.in_flight,
                "vocab_size": self.tokenizer.vocab_size,
                "requests": self.counts,
                "engine": self.engine.stats(),
            }
        )

    # --- JSON pieces ---

    def _token_json(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        entry = self.tokenizer.token(token_id)
        lp = None if logprob is None or math.isnan(logprob) else float(logprob)
        return {"id": token_id, "text": entry.text, "logprob": lp, "special": entry.special}

    @staticmethod
    def _seed(live: Live) -> int | None:
        return live.valid.seed if live.valid.sampling else None

    def _stream_details(self, live: Live) -> dict[str, Any]:
        return {
            "finish_reason": live.finish_reason,
            "generated_tokens": len(live.tokens),
            "seed": self._seed(live),
            "input_length": live.valid.input_length,
        }

    def _details(self, live: Live, with_prefill: bool) -> dict[str, Any]:
        prefill = []
        if with_prefill:
            tokens = self.tokenizer.encode(live.valid.inputs, live.valid.add_special_tokens)[-live.valid.input_length :]
            prefill = [{"id": t.id, "text": t.text, "logprob": None} for t in tokens]
        return {
            "finish_reason": live.finish_reason,
            "generated_tokens": len(live.tokens),
            "seed": self._seed(live),
            "prefill": prefill,
            "tokens": [self._token_json(t, lp) for t, lp in zip(live.tokens, live.logprobs, strict=True)],
        }

    def _timing_headers(self, inputs: str, live: Live, t_start_ns: int, now_ns: int) -> dict[str, str]:
        total_ns = now_ns - t_start_ns
        inference_ns = now_ns - live.queued_ns
        return {
            "x-compute-type": self.config.compute_type,
            "x-compute-time": wire.seconds_header(total_ns),
            "x-compute-characters": str(len(inputs)),
            "x-total-time": wire.millis_header(total_ns),
            "x-validation-time": wire.millis_header(live.queued_ns - t_start_ns),
            "x-queue-time": "0",
            "x-inference-time": wire.millis_header(inference_ns),
            "x-time-per-token": wire.millis_header(inference_ns // max(len(live.tokens), 1)),
            "x-prompt-tokens": str(live.valid.input_length),
            "x-generated-tokens": str(len(live.tokens)),
        }


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=wire.dumps(body), status=status, headers=headers, content_type="application/json")


def _rejection(e: BodyRejection) -> web.Response:
    return web.Response(status=e.status, text=e.message, content_type="text/plain", charset="utf-8")


# --- command line ---


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu.reference_backend",
        description="TGI-API server over a random-init Llama (no downloads): CUDA-graph or transformers engine.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3000)
    parser.add_argument("--engine", choices=("graph", "cb"), default="graph", help="graph (default) | cb (fallback)")
    parser.add_argument("--model-id", default=None, help="what /info reports (default: from the model's shape)")
    parser.add_argument("--max-concurrent-requests", type=int, default=128)
    parser.add_argument("--max-input-tokens", type=int, default=1024)
    parser.add_argument("--max-total-tokens", type=int, default=2048)
    parser.add_argument("--max-stop-sequences", type=int, default=4)
    parser.add_argument("--allow-eos", action="store_true", help="stop at the EOS token (off: exactly max_new_tokens)")
    parser.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    parser.add_argument(
        "--dtype", choices=("bf16", "fp16", "fp32", "fp8"), default=None, help="default: bf16 (cpu: fp32); fp8: graph"
    )
    parser.add_argument("--tiny", action="store_true", help="a tiny model (2 layers, hidden 64, vocab 2048) for tests")
    shape = ModelShape()
    parser.add_argument("--layers", type=int, default=None, help=f"default {shape.num_hidden_layers}")
    parser.add_argument("--hidden", type=int, default=None, help=f"default {shape.hidden_size}")
    parser.add_argument("--intermediate", type=int, default=None, help=f"default {shape.intermediate_size}")
    parser.add_argument("--heads", type=int, default=None, help=f"default {shape.num_attention_heads}")
    parser.add_argument("--kv-heads", type=int, default=None, help=f"default {shape.num_key_value_heads}")
    parser.add_argument("--vocab", type=int, default=None, help=f"default {shape.vocab_size}")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="prompt tokens per prefill (default 8192)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    graph = parser.add_argument_group("graph engine")
    graph.add_argument("--max-batch-size", type=int, default=64, help="KV-cache slots: requests decoding at once")
    graph.add_argument("--no-cuda-graphs", action="store_true", help="eager decode steps (for comparison)")
    cb = parser.add_argument_group("cb engine (transformers' continuous batching)")
    cb.add_argument("--attn", default="sdpa", help="attention implementation (the manager makes it paged|...)")
    cb.add_argument("--block-size", type=int, default=None, help="KV-cache block in tokens (default 256; tiny 32)")
    cb.add_argument("--kv-blocks", type=int, default=None, help="KV-cache blocks (default: 90 %% of free memory)")
    cb.add_argument("--prefix-sharing", action="store_true", help="let repeated prompt prefixes share KV blocks")
    cb.add_argument("--no-warmup", action="store_true")
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[ServerConfig, EngineConfig | GraphEngineConfig]:
    from bench.gpu.reference_engine import LLAMA3_8B, TINY

    base = TINY if args.tiny else LLAMA3_8B
    overrides = {
        "num_hidden_layers": args.layers,
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "vocab_size": args.vocab,
    }
    shape = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "bf16")
    server = ServerConfig(
        model_id=args.model_id or f"joulegate/{shape.name}-{dtype}",
        max_concurrent_requests=args.max_concurrent_requests,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        max_stop_sequences=args.max_stop_sequences,
        allow_eos=args.allow_eos,
    )
    server.validation_config()  # TGI's start-up checks (max_input_tokens < max_total_tokens, ...)
    engine: EngineConfig | GraphEngineConfig
    if args.engine == "graph":
        max_batch_tokens = args.max_batch_tokens or max(8192, args.max_input_tokens)
        if max_batch_tokens < args.max_input_tokens:
            raise ValueError(f"--max-batch-tokens {max_batch_tokens} < --max-input-tokens {args.max_input_tokens}")
        engine = GraphEngineConfig(
            shape=shape,
            device=args.device,
            dtype=dtype,
            seed=args.seed,
            max_batch_size=args.max_batch_size,
            max_len=args.max_total_tokens,
            max_batch_tokens=max_batch_tokens,
            cuda_graphs=not args.no_cuda_graphs,
        )
        return server, engine
    if dtype == "fp8":
        raise ValueError("--dtype fp8 needs --engine graph")
    block_size = args.block_size or (32 if args.tiny else 256)
    num_blocks = args.kv_blocks
    if num_blocks is None and args.device == "cpu":
        # on a CPU the manager would size the cache from free RAM: size it for the limits instead
        num_blocks = -(-args.max_concurrent_requests * args.max_total_tokens // block_size) + 1
    max_batch_tokens = args.max_batch_tokens
    if max_batch_tokens is None and args.device == "cpu":
        max_batch_tokens = max(args.max_input_tokens, 512)
    engine = EngineConfig(
        shape=shape,
        device=args.device,
        dtype=dtype,
        attn_implementation=args.attn,
        seed=args.seed,
        block_size=block_size,
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        prefix_sharing=args.prefix_sharing,
        warmup=not args.no_warmup,
    )
    return server, engine


def build_engine(config: EngineConfig | GraphEngineConfig) -> Engine:
    """The engine a config describes (imports torch, and transformers for ``cb``)."""
    if isinstance(config, GraphEngineConfig):
        from bench.gpu.graph_engine import GraphEngine

        return GraphEngine(config)
    from bench.gpu.reference_engine import CBEngine

    return CBEngine(config)


async def serve(server_config: ServerConfig, engine_config: EngineConfig | GraphEngineConfig, host: str,
                port: int) -> None:  # fmt: skip
    """Build the model, serve until SIGINT or SIGTERM, then stop the engine."""
    engine = build_engine(engine_config)
    server = ReferenceServer(server_config, engine, WordTokenizer(engine_config.shape.vocab_size))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        url = await server.start(host, port)
        ready = {
            "url": url,
            "model_id": server_config.model_id,
            "engine": "graph" if isinstance(engine_config, GraphEngineConfig) else "cb",
            "parameters": engine.parameters,  # type: ignore[attr-defined]
            "build_s": round(engine.build_s, 2),  # type: ignore[attr-defined]
            "start_s": round(engine.start_s, 2),  # type: ignore[attr-defined]
            "stats": engine.stats(),
        }
        print(f"READY {json.dumps(ready)}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        await asyncio.to_thread(engine.stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        server_config, engine_config = configs_from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    asyncio.run(serve(server_config, engine_config, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
