"""TGI's OpenAI-compatible routes: ``POST /v1/completions`` and ``POST /v1/chat/completions``.

Both map onto the same engine as ``/generate`` the way TGI does (router/src/server.rs ``completions``,
``chat_completions``; lib.rs ``ChatRequest::try_into_generate``): ``temperature == 0`` means greedy, any other value
(or none) samples; chat's ``presence_penalty`` becomes ``repetition_penalty = presence_penalty + 2``; ``top_logprobs``
becomes ``top_n_tokens``. Streams end with ``data:[DONE]``; a chat stream with ``stream_options.include_usage`` sends
one more chunk, with empty ``choices`` and the ``usage``, before it. Errors met while streaming are OpenAI-style events
``{"error": {"message", "http_status_code": 422}}``.

The chat template is deliberately trivial: the messages' text contents joined by newlines, no special tokens. Tools
and ``response_format`` are accepted and ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sim import wire
from sim.generation import top_tokens
from sim.infer import InferError, StreamBatch
from sim.responses import json_response, rejection_response
from sim.tokenizer import VOCAB
from sim.validation import (
    BodyRejection,
    GenerateParameters,
    GenerateRequest,
    as_bool,
    as_f32,
    as_string,
    as_strings,
    as_u32,
    as_u64,
    data_error,
)

if TYPE_CHECKING:
    from sim.server import SimTGI


def _field(doc: Mapping[str, Any], name: str, parse: Callable[[Any], Any], default: Any = None) -> Any:
    """An optional field: absent or null gives ``default``; a wrong type is axum's 422."""
    value = doc.get(name)
    if value is None:
        return default
    try:
        return parse(value)
    except TypeError as e:
        raise data_error(f"{name}: {e}") from None


def _prompts(doc: Mapping[str, Any]) -> list[str]:
    if "prompt" not in doc:
        raise data_error("missing field `prompt`")
    value = doc["prompt"]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        if not value:
            raise data_error("prompt: Empty array detected. Do not use an empty array for the prompt.")
        return list(value)
    raise data_error("prompt: data did not match any variant of untagged enum PromptDeserializer")


def _greedy(temperature: float | None) -> tuple[bool, float | None]:
    """(do_sample, temperature): TGI turns temperature 0 into greedy decoding."""
    return (False, None) if temperature == 0.0 else (True, temperature)


def _model(tgi: SimTGI, model: str | None) -> str:
    return tgi.config.model_id if model in (None, "tgi") else model


def _error(e: InferError) -> web.Response:

    return json_response(wire.error_body(e.message, e.error_type), status=e.status)


async def _sse_response(tgi: SimTGI, request: web.Request, inputs_chars: int) -> web.StreamResponse:
    response = web.StreamResponse(status=200, headers=tgi.sse_headers(inputs_chars))
    await response.prepare(request)
    return response


async def _pump(
    tgi: SimTGI, req: GenerateRequest, request_id: str, encode: Callable[[StreamBatch], bytes]
) -> AsyncIterator[bytes]:
    """One generation's SSE bytes (an in-stream error as an OpenAI error event)."""
    gen = tgi.infer.generate_stream(req, request_id)
    try:
        async with contextlib.aclosing(gen):
            async for batch in gen:
                if batch.tokens:
                    yield encode(batch)
                    if batch.end:
                        sim = batch.request
                        tgi.metrics.success(sim.valid.input_length, len(sim.tokens))
    except InferError as e:
        yield wire.openai_error_event(e.message)


# --- /v1/completions ---


async def completions(tgi: SimTGI, request: web.Request) -> web.StreamResponse:

    t_start_ns = time.time_ns()
    try:
        doc = await tgi.read_body(request)
        if not isinstance(doc, Mapping):
            raise data_error("invalid type: expected struct CompletionRequest")
        prompts = _prompts(doc)
        stream = _field(doc, "stream", as_bool, False)
        suffix = _field(doc, "suffix", as_string)
        model = _field(doc, "model", as_string)
        do_sample, temperature = _greedy(_field(doc, "temperature", as_f32))
        parameters = GenerateParameters(
            temperature=temperature,
            repetition_penalty=_field(doc, "repetition_penalty", as_f32),
            frequency_penalty=_field(doc, "frequency_penalty", as_f32),
            top_p=_field(doc, "top_p", as_f32),
            do_sample=do_sample,
            max_new_tokens=_field(doc, "max_tokens", as_u32),
            stop=_field(doc, "stop", as_strings, ()),
            details=True,
            decoder_input_details=not stream,
            seed=_field(doc, "seed", as_u64),
            adapter_id=None if model in (None, "tgi") else model,
        )
    except BodyRejection as e:
        return rejection_response(e)
    tgi.metrics.request_received()
    if suffix is not None:
        tgi.metrics.failure("validation")
        return json_response(
            wire.error_body(
                "Suffix is not supported and can be achieved by preprocessing the prompt.", "suffix not supported"
            ),
            status=422,
        )
    if len(prompts) > tgi.config.max_client_batch_size:
        tgi.metrics.failure("validation")
        return json_response(
            wire.error_body(
                f"Number of prompts exceeds the maximum allowed batch size of {tgi.config.max_client_batch_size}",
                "batch size exceeded",
            ),
            status=422,
        )
    request_id = tgi.request_id(request)
    requests = [GenerateRequest(inputs=p, parameters=parameters) for p in prompts]
    created = int(time.time())
    model_id = tgi.config.model_id
    fingerprint = tgi.system_fingerprint
    if stream:
        response = await _sse_response(tgi, request, sum(len(p) for p in prompts))

        def encoder(choice: int) -> Callable[[StreamBatch], bytes]:
            def encode(batch: StreamBatch) -> bytes:
                sim = batch.request
                parts = []
                for k, index in enumerate(batch.tokens):
                    text = VOCAB[index].text
                    if batch.end and k == len(batch.tokens) - 1:
                        prompt_tokens = sim.valid.input_length
                        body: dict[str, Any] = {
                            "object": "text_completion",
                            "id": "",
                            "created": int(time.time()),
                            "model": model_id,
                            "system_fingerprint": fingerprint,
                            "choices": [
                                {"index": choice, "text": text, "logprobs": None, "finish_reason": sim.finish_reason}
                            ],
                            "usage": {
                                "prompt_tokens": prompt_tokens,
                                "completion_tokens": len(sim.tokens),
                                "total_tokens": prompt_tokens + len(sim.tokens),
                            },
                        }
                    else:
                        body = {
                            "object": "text_completion",
                            "id": "",
                            "created": int(time.time()),
                            "choices": [{"index": choice, "text": text, "logprobs": None, "finish_reason": ""}],
                            "model": model_id,
                            "system_fingerprint": fingerprint,
                        }
                    parts.append(wire.sse(body))
                return b"".join(parts)

            return encode

        streams = [_pump(tgi, r, request_id, encoder(i)) for i, r in enumerate(requests)]
        try:
            async for data in _merge(streams):
                await response.write(data)
            await response.write(wire.SSE_DONE)
        except ConnectionResetError:
            pass
        return response

    tasks = [asyncio.ensure_future(tgi.generate_internal(r, request_id, t_start_ns)) for r in requests]
    try:
        results = await asyncio.gather(*tasks)
    except InferError as e:
        return _error(e)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    choices = []
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    summed = dict.fromkeys(
        (
            "x-compute-characters",
            "x-total-time",
            "x-validation-time",
            "x-queue-time",
            "x-inference-time",
            "x-time-per-token",
            "x-prompt-tokens",
            "x-generated-tokens",
        ),
        0,
    )
    for index, (headers, body, input_length) in enumerate(results):
        details = body["details"]
        finish = "stop" if details["finish_reason"] == "eos_token" else details["finish_reason"]
        choices.append({"index": index, "text": body["generated_text"], "logprobs": None, "finish_reason": finish})
        usage["prompt_tokens"] += input_length
        usage["completion_tokens"] += details["generated_tokens"]
        usage["total_tokens"] += input_length + details["generated_tokens"]
        for name in summed:
            summed[name] += int(headers[name])
    out_headers = {"x-compute-type": tgi.config.compute_type, **{k: str(v) for k, v in summed.items()}}
    final = {
        "object": "text_completion",
        "id": "",
        "created": created,
        "model": model_id,
        "system_fingerprint": fingerprint,
        "choices": choices,
        "usage": usage,
    }
    return json_response(final, headers=out_headers)


async def _merge(streams: list[AsyncIterator[bytes]]) -> AsyncIterator[bytes]:
    """Interleave several generations' events as they come (one stream needs no machinery)."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield chunk
        return
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def drain(stream: AsyncIterator[bytes]) -> None:
        try:
            async for data in stream:
                await queue.put(data)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(drain(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            data = await queue.get()
            if data is None:
                remaining -= 1
            else:
                yield data
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- /v1/chat/completions ---


def _message_text(message: Any, i: int) -> str:
    if not isinstance(message, Mapping):
        raise data_error(f"messages[{i}]: invalid type: expected struct Message")
    if "role" not in message:
        raise data_error(f"messages[{i}]: missing field `role`")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for chunk in content:
            if isinstance(chunk, Mapping) and chunk.get("type") == "text" and isinstance(chunk.get("text"), str):
                texts.append(chunk["text"])
        return "".join(texts)
    if content is None and "tool_calls" in message:
        return ""
    raise data_error(f"messages[{i}]: data did not match any variant of untagged enum MessageBody")


def chat_template(messages: list[Any]) -> str:
    """The simulator's chat template: the messages' texts, one per line."""
    return "\n".join(_message_text(m, i) for i, m in enumerate(messages))


async def chat_completions(tgi: SimTGI, request: web.Request) -> web.StreamResponse:

    t_start_ns = time.time_ns()
    try:
        doc = await tgi.read_body(request)
        if not isinstance(doc, Mapping):
            raise data_error("invalid type: expected struct ChatRequest")
        if "messages" not in doc:
            raise data_error("missing field `messages`")
        if not isinstance(doc["messages"], list):
            raise data_error("messages: invalid type: expected a sequence")
        inputs = chat_template(doc["messages"])
        stream = _field(doc, "stream", as_bool, False)
        logprobs = _field(doc, "logprobs", as_bool, False)
        model = _field(doc, "model", as_string)
        presence_penalty = _field(doc, "presence_penalty", as_f32)
        max_tokens = _field(doc, "max_tokens", as_u32)
        if max_tokens is None:
            max_tokens = _field(doc, "max_completion_tokens", as_u32)
        stream_options = doc.get("stream_options") or {}
        if not isinstance(stream_options, Mapping):
            raise data_error("stream_options: invalid type: expected struct StreamOptions")
        include_usage = _field(stream_options, "include_usage", as_bool, False)
        do_sample, temperature = _greedy(_field(doc, "temperature", as_f32))
        parameters = GenerateParameters(
            temperature=temperature,
            repetition_penalty=None if presence_penalty is None else presence_penalty + 2.0,
            frequency_penalty=_field(doc, "frequency_penalty", as_f32),
            top_p=_field(doc, "top_p", as_f32),
            do_sample=do_sample,
            max_new_tokens=max_tokens,
            stop=_field(doc, "stop", as_strings, ()),
            details=True,
            seed=_field(doc, "seed", as_u64),
            top_n_tokens=_field(doc, "top_logprobs", as_u32),
            adapter_id=None if model in (None, "tgi") else model,
        )
    except BodyRejection as e:
        return rejection_response(e)
    request_id = tgi.request_id(request)
    req = GenerateRequest(inputs=inputs, parameters=parameters, add_special_tokens=False)
    model_id = _model(tgi, model)
    fingerprint = tgi.system_fingerprint
    if not stream:
        tgi.metrics.request_received()
        try:
            headers, body, input_length = await tgi.generate_internal(req, request_id, t_start_ns)
        except InferError as e:
            return _error(e)
        details = body["details"]
        finish = "stop" if details["finish_reason"] == "eos_token" else details["finish_reason"]
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": body["generated_text"]},
            "logprobs": None,
            "finish_reason": finish,
        }
        if logprobs:
            tops = details.get("top_tokens") or []
            choice["logprobs"] = {
                "content": [
                    {
                        "token": t["text"],
                        "logprob": t["logprob"],
                        "top_logprobs": [{"token": x["text"], "logprob": x["logprob"]} for x in tops[i]]
                        if i < len(tops)
                        else [],
                    }
                    for i, t in enumerate(details["tokens"])
                ]
            }
        generated = details["generated_tokens"]
        completion = {
            "object": "chat.completion",
            "id": "",
            "created": int(time.time()),
            "model": model_id,
            "system_fingerprint": fingerprint,
            "choices": [choice],
            "usage": {
                "prompt_tokens": input_length,
                "completion_tokens": generated,
                "total_tokens": input_length + generated,
            },
        }
        return json_response(completion, headers=headers)

    tgi.metrics.request_received()
    response = await _sse_response(tgi, request, len(inputs))

    def encode(batch: StreamBatch) -> bytes:
        sim = batch.request
        parts = []
        for k, index in enumerate(batch.tokens):
            entry = VOCAB[index]
            last = batch.end and k == len(batch.tokens) - 1
            finish = None
            if last:
                finish = "stop" if sim.finish_reason == "eos_token" else sim.finish_reason
            chunk_logprobs = None
            if logprobs:
                top = top_tokens(index, sim.valid.top_n_tokens)
                chunk_logprobs = {
                    "content": [
                        {
                            "token": entry.text,
                            "logprob": entry.logprob,
                            "top_logprobs": [{"token": t.text, "logprob": t.logprob} for t in top],
                        }
                    ]
                }
            chunk = {
                "object": "chat.completion.chunk",
                "id": "",
                "created": int(time.time()),
                "model": model_id,
                "system_fingerprint": fingerprint,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"role": "assistant", "content": "" if entry.special else entry.text},
                        "logprobs": chunk_logprobs,
                        "finish_reason": finish,
                    }
                ],
                "usage": None,
            }
            parts.append(wire.sse(chunk))
            if last and include_usage:
                prompt_tokens = sim.valid.input_length
                usage_chunk = {
                    "object": "chat.completion.chunk",
                    "id": "",
                    "created": int(time.time()),
                    "model": model_id,
                    "system_fingerprint": fingerprint,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": len(sim.tokens),
                        "total_tokens": prompt_tokens + len(sim.tokens),
                    },
                }
                parts.append(wire.sse(usage_chunk))
        return b"".join(parts)

    try:
        async for data in _pump(tgi, req, request_id, encode):
            await response.write(data)
        await response.write(wire.SSE_DONE)
    except ConnectionResetError:
        pass
    return response
