"""TGI's own routes: /generate, /generate_stream, / (compat), /tokenize, /info, /health.

Every generation is sent to a backend's ``/generate_stream`` with ``details: true`` through ``Gateway.stream``
(the first token marks the end of prefill for the meter), whatever the client asked for: a non-streamed answer
is assembled from the stream, ``details`` left out again when the client asked for none.

Not supported: ``decoder_input_details`` and ``best_of > 1`` on non-streamed calls (TGI computes them only on its
non-streaming path, which would hide prefill from the meter): 422 at once. On streams TGI refuses both itself, in
the stream, and the gateway passes that refusal on unchanged. The model is named by the ``x-model-id`` header, or is
the gateway's only model.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from common.errors import InvalidArgument
from proxy.gateway import GenerationStream
from proxy.http import wire
from proxy.http.assemble import GenerateAssembler, Timing, client_stream_event, timing_headers
from proxy.http.bodies import GenerateBody, parse_generate
from proxy.http.context import Call, Services, call_of
from proxy.http.errors import tgi_error_event
from proxy.http.streaming import relay
from proxy.job import Job
from proxy.sse import PlainRun

MODEL_HEADER = "x-model-id"
UPSTREAM_ROUTE = "/generate_stream"


async def collect(stream: GenerationStream, feed: Callable[[dict[str, Any]], None]) -> int:
    """Read ``stream`` to its end, feeding every event; return when it ended (ns)."""
    async with contextlib.aclosing(stream.batches()) as batches:
        async for batch in batches:
            for event in batch:
                feed(event)
    return time.time_ns()


def check_max_new_tokens(services: Services, model_id: str, requested: int | None, field: str) -> int:
    """The model's cap on new tokens (``models.max_new_tokens``); the cap doubles as the estimate when unset."""
    cap = services.limit(model_id).max_new_tokens
    if requested is not None and requested > cap:
        raise InvalidArgument(f"Input validation error: `{field}` must be <= {cap} (this gateway's limit)")
    return requested if requested is not None else cap


class TgiRoutes:
    def __init__(self, services: Services) -> None:
        self.s = services

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/generate", self.generate)
        app.router.add_post("/generate_stream", self.generate_stream)
        app.router.add_post("/", self.compat)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_get("/info", self.info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/", self.health)
        app.router.add_get("/ping", self.health)

    def _model(self, request: web.Request) -> str:
        call_of(request).model_id = request.headers.get(MODEL_HEADER, "")
        return self.s.gateway.resolve_model(call_of(request).model_id)

    # -- generation --------------------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        body = parse_generate(await request.read())
        return await self._unary(request, body, compat=False)

    async def generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = parse_generate(await request.read())
        return await self._stream(request, body, compat=False)

    async def compat(self, request: web.Request) -> web.StreamResponse:
        """TGI's ``/``: ``stream`` picks the route; non-streamed answers are a one-element list."""
        body = parse_generate(await request.read())
        if body.stream:
            return await self._stream(request, body, compat=True)
        return await self._unary(request, body, compat=True)

    def _job(self, call: Call, model_id: str, body: GenerateBody, compat: bool) -> Job:
        max_new_tokens = check_max_new_tokens(self.s, model_id, body.max_new_tokens, "max_new_tokens")
        params = dict(body.parameters)
        params["details"] = True
        if compat and params.get("return_full_text") is None:
            # TGI: the compat route returns the full text by default for text-generation models
            info = self.s.gateway.pool(model_id).info or {}
            params["return_full_text"] = info.get("model_pipeline_tag", "text-generation") == "text-generation"
        upstream = {k: v for k, v in body.doc.items() if k != "stream"}
        upstream["parameters"] = params
        return call.job(
            self.s.gateway,
            model_id=model_id,
            inputs=body.inputs,
            body=upstream,
            route=UPSTREAM_ROUTE,
            max_new_tokens=max_new_tokens,
        )

    async def _unary(self, request: web.Request, body: GenerateBody, *, compat: bool) -> web.StreamResponse:
        call = call_of(request)
        model_id = self._model(request)
        params = body.parameters
        if params.get("decoder_input_details"):
            raise InvalidArgument(
                "Input validation error: `decoder_input_details` is not supported by this gateway "
                "(it streams from TGI to meter prefill and decode, and TGI gives prefill details only unstreamed)"
            )
        if (params.get("best_of") or 1) > 1:
            raise InvalidArgument(
                "Input validation error: `best_of` != 1 is not supported by this gateway (it streams from TGI)"
            )
        job = self._job(call, model_id, body, compat)
        handed_ns = time.time_ns()
        stream = self.s.gateway.generation(job)
        assembler = GenerateAssembler()
        with self.s.gateway.recording([stream]):
            done_ns = await collect(stream, assembler.feed)
        answer = assembler.response(details=bool(params.get("details")), top_n_tokens=bool(params.get("top_n_tokens")))
        timing = Timing(
            received_ns=call.received_ns,
            handed_ns=handed_ns,
            released_ns=stream.released_ns,
            done_ns=done_ns,
            prompt_tokens=stream.prompt_tokens or 0,
            generated_tokens=stream.generated_tokens,
        )
        headers = timing_headers(timing, compute_type=stream.compute_type, inputs_chars=len(body.inputs))
        return wire.json_response([answer] if compat else answer, headers={**headers, **call.headers()})

    async def _stream(self, request: web.Request, body: GenerateBody, *, compat: bool) -> web.StreamResponse:
        call = call_of(request)
        job = self._job(call, self._model(request), body, compat)
        stream = self.s.gateway.generation(job)
        details = bool(body.parameters.get("details"))

        def headers() -> dict[str, str]:
            out = {"x-compute-type": stream.compute_type} if stream.compute_type else {}
            return {**out, "x-compute-characters": str(len(body.inputs)), **call.headers()}

        def encode(event: dict[str, Any] | PlainRun) -> bytes:
            if event.__class__ is PlainRun:
                return event.data  # TGI's bytes: the client asked for TGI's stream
            return wire.sse(client_stream_event(event, details=details))  # type: ignore[arg-type]

        with self.s.gateway.recording([stream]):
            return await relay(
                request,
                stream.raw_batches(),
                [stream],
                headers=headers,
                encode=encode,
                error_event=tgi_error_event,
            )

    # -- the rest ----------------------------------------------------------------------------------------------
    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        body = parse_generate(await request.read())
        options = {k: v for k, v in body.doc.items() if k != "inputs"}
        tokens = await self.s.gateway.tokenize(self._model(request), body.inputs, options=options)
        return wire.json_response(tokens, headers=call_of(request).headers())

    async def info(self, request: web.Request) -> web.StreamResponse:
        """A backend's /info, with the model named as this gateway serves it."""
        model_id = self._model(request)
        info = await self.s.gateway.model_info(model_id)
        return wire.json_response({**info, "model_id": model_id}, headers=call_of(request).headers())

    async def health(self, request: web.Request) -> web.StreamResponse:
        """200 while a backend (of the ``x-model-id`` model, when named) is healthy and the gateway not draining."""
        gateway = self.s.gateway
        named = request.headers.get(MODEL_HEADER)
        healthy = gateway.healthy if not named else (not gateway.draining and gateway.pool(named).healthy)
        if healthy:
            return web.Response(status=200, headers=call_of(request).headers())
        return wire.json_response(
            wire.error_body("unhealthy", "healthcheck"), status=503, headers=call_of(request).headers()
        )
