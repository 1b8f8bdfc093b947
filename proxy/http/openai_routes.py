"""TGI's OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Forwarded to the backend's own OpenAI routes (TGI applies the model's chat template; the gateway cannot), always
with ``stream: true`` and, for chat, ``stream_options.include_usage`` so that the gateway learns the exact token
counts; the usage chunk is passed on only when the client asked for it. Non-streamed answers are assembled from the
chunks. ``model`` names a joulegate model (``tgi`` or none: the only one); upstream it becomes ``tgi``, because TGI
reads any other name as a LoRA adapter id, and answers name the model as the gateway serves it. A multi-prompt
completion runs as one gateway request per prompt (``<request id>-<i>``), as TGI runs them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web

from common.errors import GatewayError, InvalidArgument
from common.ids import text_request_ids
from proxy.gateway import GenerationStream
from proxy.http import wire
from proxy.http.assemble import (
    ChatAssembler,
    CompletionAssembler,
    Timing,
    completion_response,
    timing_headers,
)
from proxy.http.bodies import parse_chat, parse_completion
from proxy.http.context import Call, Services, call_of
from proxy.http.errors import openai_error_event
from proxy.http.streaming import Batches, merge, relay
from proxy.http.tgi_routes import check_max_new_tokens, collect
from proxy.sse import PlainRun

CHAT_ROUTE = "/v1/chat/completions"
COMPLETIONS_ROUTE = "/v1/completions"


class OpenAIRoutes:
    def __init__(self, services: Services) -> None:
        self.s = services

    def add_to(self, app: web.Application) -> None:
        app.router.add_post(CHAT_ROUTE, self.chat_completions)
        app.router.add_post(COMPLETIONS_ROUTE, self.completions)
        app.router.add_get("/v1/models", self.models)

    def _model(self, call: Call, name: str | None) -> str:
        call.model_id = "" if name in (None, "", "tgi") else str(name)
        return self.s.gateway.resolve_model(call.model_id)

    def _timing(self, call: Call, handed_ns: int, done_ns: int, results: list[GenerationStream]) -> Timing:
        released = [r.released_ns for r in results if r.released_ns is not None]
        return Timing(
            received_ns=call.received_ns,
            handed_ns=handed_ns,
            released_ns=min(released) if released else None,
            done_ns=done_ns,
            prompt_tokens=sum(r.prompt_tokens or 0 for r in results),
            generated_tokens=sum(r.generated_tokens for r in results),
        )

    @staticmethod
    def _headers(call: Call, results: list[GenerationStream], inputs_chars: int) -> dict[str, str]:
        compute_type = next((r.compute_type for r in results if r.compute_type), None)
        out = {"x-compute-type": compute_type} if compute_type else {}
        return {**out, "x-compute-characters": str(inputs_chars), **call.headers()}

    # -- chat ----------------------------------------------------------------------------------------------------
    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        call = call_of(request)
        body = parse_chat(await request.read())
        model_id = self._model(call, body.model)
        max_tokens = check_max_new_tokens(self.s, model_id, body.max_tokens, "max_tokens")
        upstream = {**body.doc, "model": "tgi", "stream": True, "stream_options": {"include_usage": True}}
        job = call.job(
            self.s.gateway,
            model_id=model_id,
            inputs=body.text,
            body=upstream,
            route=CHAT_ROUTE,
            max_new_tokens=max_tokens,
        )
        handed_ns = time.time_ns()
        stream = self.s.gateway.generation(job)
        if not body.stream:
            assembler = ChatAssembler()
            with self.s.gateway.recording([stream]):
                done_ns = await collect(stream, assembler.feed)
            timing = self._timing(call, handed_ns, done_ns, [stream])
            headers = timing_headers(timing, compute_type=stream.compute_type, inputs_chars=len(body.text))
            return wire.json_response(assembler.completion(model_id), headers={**headers, **call.headers()})

        def encode_chunk(chunk: dict[str, Any]) -> bytes:
            if not chunk.get("choices") and chunk.get("usage") and not body.include_usage:
                return b""  # the usage the gateway asked for, not the client
            if "model" in chunk:
                chunk["model"] = model_id
            return wire.sse(chunk)

        ours = b'"model":' + wire.dumps(model_id)

        def encode(chunk: dict[str, Any] | PlainRun) -> bytes:
            if chunk.__class__ is not PlainRun:
                return encode_chunk(chunk)  # type: ignore[arg-type]
            data = chunk.data
            renamed = wire.rename_model(data, chunk.events, ours)
            if renamed is not None:
                return renamed
            return b"".join(map(encode_chunk, wire.sse_events(data)))

        with self.s.gateway.recording([stream]):
            return await relay(
                request,
                stream.raw_batches(),
                [stream],
                headers=lambda: self._headers(call, [stream], len(body.text)),
                encode=encode,
                error_event=openai_error_event,
                trailer=wire.SSE_DONE,
            )

    # -- completions -----------------------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        call = call_of(request)
        body = parse_completion(await request.read())
        model_id = self._model(call, body.model)
        max_tokens = check_max_new_tokens(self.s, model_id, body.max_tokens, "max_tokens")
        n = len(body.prompts)
        info = self.s.gateway.pool(model_id).info or {}
        most = self.s.max_batch_requests
        batch_limit = min(int(info.get("max_client_batch_size") or most), most)
        if n > batch_limit:
            raise InvalidArgument(f"Number of prompts exceeds the maximum allowed batch size of {batch_limit}")
        ids = text_request_ids(call.request_id, n)
        jobs = [
            call.job(
                self.s.gateway,
                model_id=model_id,
                inputs=prompt,
                body={**body.doc, "prompt": prompt, "model": "tgi", "stream": True},
                route=COMPLETIONS_ROUTE,
                max_new_tokens=max_tokens,
                request_id=rid,
            )
            for rid, prompt in zip(ids, body.prompts, strict=True)
        ]
        handed_ns = time.time_ns()
        streams = [self.s.gateway.generation(job) for job in jobs]
        chars = sum(len(p) for p in body.prompts)
        if not body.stream:
            parts = [CompletionAssembler() for _ in jobs]
            with self.s.gateway.recording(streams):
                try:
                    async with asyncio.TaskGroup() as tg:
                        for stream, part in zip(streams, parts, strict=True):
                            tg.create_task(collect(stream, part.feed))
                except* GatewayError as group:
                    raise group.exceptions[0] from None
            timing = self._timing(call, handed_ns, time.time_ns(), streams)
            headers = timing_headers(
                timing, compute_type=next((r.compute_type for r in streams if r.compute_type), None), inputs_chars=chars
            )
            return wire.json_response(completion_response(model_id, parts), headers={**headers, **call.headers()})

        def tag(i: int, chunk: dict[str, Any]) -> dict[str, Any]:
            for choice in chunk.get("choices") or ():
                choice["index"] = i
            return chunk

        def encode(chunk: dict[str, Any]) -> bytes:
            if "model" in chunk:
                chunk["model"] = model_id
            return wire.sse(chunk)

        batches: list[Batches] = [stream.batches() for stream in streams]
        with self.s.gateway.recording(streams):
            return await relay(
                request,
                batches[0] if n == 1 else merge(batches, tag),
                streams,
                headers=lambda: self._headers(call, streams, chars),
                encode=encode,
                error_event=openai_error_event,
                trailer=wire.SSE_DONE,
            )

    # -- models ----------------------------------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.StreamResponse:
        data = [{"id": m, "object": "model", "created": 0, "owned_by": m} for m in self.s.gateway.pools]
        return wire.json_response({"object": "list", "data": data}, headers=call_of(request).headers())
