"""``SimTGI``: the simulated TGI server (aiohttp) with its engine and GPU, plus the ``/sim/*`` side door.

TGI's routes (router/src/server.rs) answer as TGI 3.x does: the same paths, JSON shapes, headers, status codes and
error texts, and SSE framed as axum frames it. Streams always answer HTTP 200: an error met on the way (validation,
overload, generation) is an SSE event ``{"error", "error_type"}`` and the stream ends, as in TGI.

The simulator adds:

- ``GET /sim/energy``: the GPU's energy counter, NVML-like (100 ms steps, configurable lag);
- ``GET /sim/truth[?request_id=]``: the true energy of every request (by ``x-request-id``) and of idle time;
- ``POST /sim/health {"healthy": false}``: make ``/health`` answer 503 (and ``true`` to heal).

Requests are filed under their ``x-request-id`` header (TGI itself ignores it), else under ``sim-<n>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import time
from typing import Any

import structlog
from aiohttp import web

from common.net import bind_tcp, http_url
from sim import tokenizer, wire
from sim.config import SimConfig
from sim.gpu import SimGPU
from sim.infer import Infer, InferError
from sim.ledger import TruthSnapshot
from sim.metrics import SimMetrics
from sim.responses import (
    SseStream,
    best_of_sequence_json,
    details_json,
    encode_tgi_batch,
    full_text,
    json_response,
    rejection_response,
    timing_headers,
)
from sim.scheduler import Scheduler, SimRequest
from sim.validation import BodyRejection, GenerateRequest, parse_generate_request, read_json

log = structlog.get_logger(__name__)

REQUEST_ID_HEADER = "x-request-id"
ROUTER_NAME = "text-generation-router"
KEEPALIVE_TICK_S = 5.0


class SimTGI:
    """A simulated TGI server on one simulated GPU. ``await start()``, use ``url``, ``await stop()``."""

    def __init__(self, config: SimConfig | None = None) -> None:
        config = config or SimConfig()
        if config.engine != "tgi":  # vLLM and SGLang have one limit, the context length: prompts may use all of it
            config = dataclasses.replace(config, max_input_tokens=config.max_total_tokens - 1)
        if config.prefix_caching is None:
            config = dataclasses.replace(config, prefix_caching=config.engine != "tgi")
        self.config = config
        self.metrics = SimMetrics(self.config.max_batch_total_tokens)
        self.healthy = True
        self._gpu: SimGPU | None = None
        self._scheduler: Scheduler | None = None
        self._infer: Infer | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.SockSite | None = None
        self._url: str | None = None
        self._ids = itertools.count(1)
        # The W3C traceparent each request came with, by request id (TGI continues the caller's trace from it).
        self.traceparents: dict[str, str] = {}
        self._ticker: asyncio.Task[None] | None = None

    # --- life cycle ---

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind, start the engine and serve; return the base URL (``http://host:port``)."""
        if self._runner is not None:
            raise RuntimeError("already started")
        sock = bind_tcp(host, port)
        self._url = http_url(host, sock)
        device = f"sim:{self.config.name or self._url}"
        self._gpu = SimGPU(self.config, device)
        self._scheduler = Scheduler(self.config, self._gpu, self.metrics)
        self._infer = Infer(self.config, self._scheduler, self.metrics)
        self._scheduler.start()
        self._ticker = asyncio.get_running_loop().create_task(self._keepalive_ticker(), name="sim-sse-keepalive")
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._add_routes(app)
        # a short shutdown_timeout: stop() cancels what still runs once its own grace period is over (aiohttp reads
        # 0 as "wait forever")
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.05)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        self._runner = runner
        self._site = site
        log.info(
            "sim_tgi_started", url=self._url, device=device, model_id=self.config.model_id, engine=self.config.engine
        )
        return self._url

    async def stop(self, grace_s: float = 0.0) -> None:
        """Stop accepting connections, give requests in flight up to ``grace_s`` to finish, cancel the rest (their
        clients see the connection close), stop the engine; the GPU goes idle."""
        runner, self._runner = self._runner, None
        if runner is not None:
            if grace_s > 0 and self._site is not None:
                await self._site.stop()
                deadline = time.monotonic() + grace_s
                while self.infer.in_flight and time.monotonic() < deadline:  # noqa: ASYNC110 (a bounded poll)
                    await asyncio.sleep(0.01)
            self._site = None
            await runner.cleanup()
        ticker, self._ticker = self._ticker, None
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if self._scheduler is not None:
            await self._scheduler.stop()

    async def __aenter__(self) -> SimTGI:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- in-process access ---

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("not started")
        return self._url

    @property
    def gpu(self) -> SimGPU:
        if self._gpu is None:
            raise RuntimeError("not started")
        return self._gpu

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("not started")
        return self._scheduler

    @property
    def infer(self) -> Infer:
        if self._infer is None:
            raise RuntimeError("not started")
        return self._infer

    @property
    def device(self) -> str:
        return self.gpu.device

    def truth(self, request_id: str | None = None) -> TruthSnapshot:
        return self.gpu.truth(request_id)

    def info(self) -> wire.Info:
        """``GET /info``: TGI's ``Info``, fields in TGI's order."""
        c = self.config
        return {
            "model_id": c.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": c.max_concurrent_requests,
            "max_best_of": c.max_best_of,
            "max_stop_sequences": c.max_stop_sequences,
            "max_input_tokens": c.max_input_tokens,
            "max_total_tokens": c.max_total_tokens,
            "validation_workers": c.validation_workers,
            "max_client_batch_size": c.max_client_batch_size,
            "router": ROUTER_NAME,
            "version": c.version,
            "sha": None,
            "docker_label": None,
        }

    @property
    def system_fingerprint(self) -> str:
        return f"{self.config.version}-native"

    # --- routes ---

    def _add_routes(self, app: web.Application) -> None:
        if self.config.engine != "tgi":
            from sim.engines import EngineRoutes

            EngineRoutes(self, self.config.engine).add_to(app)
            self._add_sim_routes(app)
            return
        app.router.add_post("/", self._compat_generate)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/generate_stream", self._generate_stream)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat_completions)
        app.router.add_get("/", self._health)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ping", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        self._add_sim_routes(app)

    def _add_sim_routes(self, app: web.Application) -> None:
        app.router.add_get("/sim/energy", self._sim_energy)
        app.router.add_get("/sim/truth", self._sim_truth)
        app.router.add_post("/sim/health", self._sim_health)
        app.router.add_get("/sim/health", self._sim_health_get)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        from sim import openai  # the OpenAI-compatible routes live in their own module

        return await openai.completions(self, request)

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        from sim import openai

        return await openai.chat_completions(self, request)

    def request_id(self, request: web.Request) -> str:
        request_id = request.headers.get(REQUEST_ID_HEADER) or f"sim-{next(self._ids)}"
        if traceparent := request.headers.get("traceparent"):
            self.traceparents[request_id] = traceparent
        return request_id

    async def read_body(self, request: web.Request) -> Any:
        """The JSON body, or ``BodyRejection`` as axum's ``Json`` extractor would reject it."""
        return read_json(await request.read(), request.headers.get("Content-Type"))

    async def _parse_generate(self, request: web.Request, compat: bool) -> GenerateRequest:
        return parse_generate_request(await self.read_body(request), compat=compat)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generate(request, compat=False)

    async def _compat_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._handle_generate(request, compat=True)

    async def _handle_generate(self, request: web.Request, compat: bool) -> web.StreamResponse:
        t_start_ns = time.time_ns()
        try:
            req = await self._parse_generate(request, compat)
        except BodyRejection as e:
            return rejection_response(e)
        request_id = self.request_id(request)
        if compat and req.parameters.return_full_text is None:
            # TGI: models tagged "text-generation" default to the full text on the compat route
            req = dataclasses.replace(req, parameters=dataclasses.replace(req.parameters, return_full_text=True))
        if compat and req.stream:
            return await self.stream_tgi(request, req, request_id)
        self.metrics.request_received()
        try:
            headers, body, _input_length = await self.generate_internal(req, request_id, t_start_ns)
        except InferError as e:
            return json_response(wire.error_body(e.message, e.error_type), status=e.status)
        return json_response([body] if compat else body, headers=headers)

    async def generate_internal(
        self, req: GenerateRequest, request_id: str, t_start_ns: int
    ) -> tuple[dict[str, str], dict[str, Any], int]:
        """server.rs ``generate_internal``: (headers, GenerateResponse, input_length); raises ``InferError``."""
        p = req.parameters
        others: list[SimRequest] | None = None
        if p.best_of is not None and p.best_of > 1:
            sim, others = await self.infer.generate_best_of(req, request_id, p.best_of)
        else:
            sim = await self.infer.generate(req, request_id)
        valid = sim.valid
        now_ns = time.time_ns()
        body: dict[str, Any] = {"generated_text": full_text(sim)}
        if p.details or p.decoder_input_details:
            details = details_json(sim, p.decoder_input_details)
            if others is not None:
                details["best_of_sequences"] = [best_of_sequence_json(o, p.decoder_input_details) for o in others]
            if valid.top_n_tokens:
                details["top_tokens"] = details.pop("top_tokens")  # after best_of_sequences, as serde orders it
            body["details"] = details
        headers = timing_headers(self.config, req.inputs, sim, t_start_ns, now_ns)
        self.metrics.success(valid.input_length, len(sim.tokens))
        return headers, body, valid.input_length

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._parse_generate(request, compat=False)
        except BodyRejection as e:
            return rejection_response(e)
        return await self.stream_tgi(request, req, self.request_id(request))

    def sse_headers(self, inputs_chars: int) -> dict[str, str]:
        return {
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "x-compute-type": self.config.compute_type,
            "x-compute-characters": str(inputs_chars),
            "X-Accel-Buffering": "no",
        }

    async def stream_tgi(self, request: web.Request, req: GenerateRequest, request_id: str) -> web.StreamResponse:
        """``/generate_stream``: one ``data:{StreamResponse}`` event per token; errors in-stream."""
        self.metrics.request_received()
        response = web.StreamResponse(status=200, headers=self.sse_headers(len(req.inputs)))
        await response.prepare(request)
        stream = SseStream(response)
        details = req.parameters.details
        gen = self.infer.generate_stream(req, request_id)
        try:
            async with contextlib.aclosing(gen):
                async for batch in gen:
                    if not batch.tokens:
                        await stream.keepalive_if_due()
                        continue
                    await stream.write(encode_tgi_batch(batch, details))
                    if batch.end:
                        sim = batch.request
                        self.metrics.success(sim.valid.input_length, len(sim.tokens))
        except InferError as e:
            await stream.write(wire.sse(wire.error_body(e.message, e.error_type)))
        except ConnectionResetError:
            pass  # the client left; closing the generator cancelled its request
        return response

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        try:
            req = await self._parse_generate(request, compat=False)
        except BodyRejection as e:
            return rejection_response(e)
        # Off the event loop (TGI tokenizes in its validation workers): a 3,000-token prompt takes milliseconds, which
        # on the loop would stall every step in progress, and the truth with it.
        return json_response(await asyncio.to_thread(_token_list, req.inputs, req.add_special_tokens))

    async def _health(self, request: web.Request) -> web.StreamResponse:
        if self.healthy:
            return web.Response(status=200)
        return json_response(wire.error_body("unhealthy", "healthcheck"), status=503)

    async def _info(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.info())

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(text=self.metrics.render(self.scheduler), content_type="text/plain", charset="utf-8")

    async def _models(self, request: web.Request) -> web.StreamResponse:
        model = self.config.model_id
        return json_response(
            {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": model}]}
        )

    async def _sim_energy(self, request: web.Request) -> web.StreamResponse:
        return json_response(self.gpu.counter().to_json())

    async def _sim_truth(self, request: web.Request) -> web.StreamResponse:
        request_id = request.query.get("request_id")
        return json_response(self.gpu.truth(request_id).to_json())

    async def _sim_health(self, request: web.Request) -> web.StreamResponse:
        try:
            doc = await self.read_body(request)
        except BodyRejection as e:
            return rejection_response(e)
        if not isinstance(doc, dict) or not isinstance(doc.get("healthy"), bool):
            return web.Response(status=422, text='expected {"healthy": true|false}')
        self.healthy = doc["healthy"]
        log.info("sim_health_set", url=self._url, healthy=self.healthy)
        return json_response({"healthy": self.healthy})

    async def _sim_health_get(self, request: web.Request) -> web.StreamResponse:
        return json_response({"healthy": self.healthy})

    async def _keepalive_ticker(self) -> None:
        """Nudge every open stream now and then, so a stream silent for 15 s sends axum's keep-alive comment."""
        while True:
            await asyncio.sleep(KEEPALIVE_TICK_S)
            if self._scheduler is not None:
                for sim in self._scheduler.active():
                    if sim.stream:
                        sim._wake()


def _token_list(inputs: str, add_special_tokens: bool) -> list[dict[str, Any]]:
    """``/tokenize``'s answer: every token with its text and UTF-8 byte offsets."""
    raw = inputs.encode("utf-8")
    return [
        {"id": t.id, "text": raw[t.start : t.stop].decode("utf-8", "replace"), "start": t.start, "stop": t.stop}
        for t in tokenizer.encode(inputs, add_special_tokens)
    ]
