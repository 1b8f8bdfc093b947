"""The simulator speaks TGI's HTTP API: shapes (checked against TGI's OpenAPI schemas), headers, SSE framing,
status codes and messages, and the ``text-generation`` client parses it."""

from __future__ import annotations

import asyncio
import json
import re

import aiohttp
import pytest
import text_generation
from text_generation import errors as tg_errors

from sim import tokenizer
from sim.server import SimTGI
from tests.sim.conftest import sse_events

TIMING_HEADERS = {
    "x-compute-type",
    "x-compute-time",
    "x-compute-characters",
    "x-total-time",
    "x-validation-time",
    "x-queue-time",
    "x-inference-time",
    "x-time-per-token",
    "x-prompt-tokens",
    "x-generated-tokens",
}


async def test_generate_shape_headers_and_details(sim: SimTGI, http: aiohttp.ClientSession, tgi_schemas) -> None:
    inputs = "Energy per token, please"
    body = {"inputs": inputs, "parameters": {"max_new_tokens": 6, "details": True, "decoder_input_details": True}}
    async with http.post(sim.url + "/generate", json=body) as r:
        assert r.status == 200
        assert r.content_type == "application/json"
        headers = {k.lower() for k in r.headers}
        out = await r.json()
        assert headers >= TIMING_HEADERS
        assert r.headers["x-compute-characters"] == str(len(inputs))
        assert r.headers["x-prompt-tokens"] == str(tokenizer.count_tokens(inputs))
        assert r.headers["x-generated-tokens"] == "6"
        assert float(r.headers["x-compute-time"]) * 1000 >= int(r.headers["x-total-time"])
        assert int(r.headers["x-inference-time"]) <= int(r.headers["x-total-time"])
    tgi_schemas.check("GenerateResponse", out)
    details = out["details"]
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 6
    assert details["seed"] is None  # greedy: TGI reports a seed only when sampling
    assert "".join(t["text"] for t in details["tokens"]) == out["generated_text"]
    prompt = tokenizer.encode(inputs)
    assert [p["id"] for p in details["prefill"]] == [t.id for t in prompt]
    assert details["prefill"][0]["logprob"] is None and details["prefill"][1]["logprob"] < 0
    assert "top_tokens" not in details and "best_of_sequences" not in details
    # deterministic: the same greedy request gives the same text; without details there are none
    async with http.post(sim.url + "/generate", json={"inputs": inputs, "parameters": {"max_new_tokens": 6}}) as r:
        again = await r.json()
    assert again == {"generated_text": out["generated_text"]}


async def test_generate_stream_is_sse_as_tgi_writes_it(sim: SimTGI, http: aiohttp.ClientSession, tgi_schemas) -> None:
    body = {"inputs": "Stream me", "parameters": {"max_new_tokens": 5, "details": True, "top_n_tokens": 2}}
    async with http.post(sim.url + "/generate_stream", json=body) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["x-compute-type"] == "gpu+optimized"
        assert r.headers["X-Accel-Buffering"] == "no"
        raw = await r.read()
    payloads = sse_events(raw)
    events = [json.loads(p) for p in payloads]
    assert all(b": " not in p[:2] for p in payloads)  # data:{...} with no space, compact JSON
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5]
    for e in events:
        tgi_schemas.check("StreamResponse", e)
        assert len(e["top_tokens"]) == 2
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    last = events[-1]
    assert last["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert last["details"] == {
        "finish_reason": "length",
        "generated_tokens": 5,
        "seed": None,
        "input_length": tokenizer.count_tokens("Stream me"),
    }
    assert list(last) == ["index", "token", "top_tokens", "generated_text", "details"]  # serde's field order
    # without top_n_tokens the hot path leaves top_tokens out, exactly as serde skips an empty Vec
    body = {"inputs": "Stream me", "parameters": {"max_new_tokens": 2}}
    async with http.post(sim.url + "/generate_stream", json=body) as r:
        payloads = sse_events(await r.read())
    first = json.loads(payloads[0])
    assert list(first) == ["index", "token", "generated_text", "details"]
    assert json.loads(payloads[1])["details"] is None  # details not asked for


async def test_compat_route(sim: SimTGI, http: aiohttp.ClientSession, tgi_schemas) -> None:
    body = {"inputs": "Compat", "parameters": {"max_new_tokens": 3}}
    async with http.post(sim.url + "/", json=body) as r:
        out = await r.json()
        assert r.status == 200 and isinstance(out, list) and len(out) == 1
        assert {k.lower() for k in r.headers} >= TIMING_HEADERS
    tgi_schemas.check("GenerateResponse", out[0])
    assert out[0]["generated_text"].startswith("Compat")  # return_full_text defaults to true on "/"
    async with http.post(sim.url + "/", json={**body, "stream": True}) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [json.loads(p) for p in sse_events(await r.read())]
    assert len(events) == 3 and events[-1]["generated_text"].startswith("Compat")


async def test_info_tokenize_health_models(sim: SimTGI, http: aiohttp.ClientSession, tgi_schemas) -> None:
    async with http.get(sim.url + "/info") as r:
        info = await r.json()
    tgi_schemas.check("Info", info)
    config = sim.config
    assert info["model_id"] == config.model_id and info["router"] == "text-generation-router"
    assert (info["max_concurrent_requests"], info["max_input_tokens"], info["max_total_tokens"]) == (128, 1024, 2048)
    assert info["max_stop_sequences"] == 4 and info["version"] == "3.3.6-dev0"

    text = "Héllo wonderful world"
    async with http.post(sim.url + "/tokenize", json={"inputs": text}) as r:
        tokens = await r.json()
    tgi_schemas.check("TokenizeResponse", tokens)
    assert tokens[0] == {"id": tokenizer.BOS_ID, "text": "", "start": 0, "stop": 0}
    raw = text.encode()
    assert b"".join(raw[t["start"] : t["stop"]] for t in tokens) == raw
    assert [t["text"] for t in tokens[1:]] == tokenizer.pieces(text)

    async with http.get(sim.url + "/health") as r:
        assert r.status == 200 and await r.read() == b""
    async with http.post(sim.url + "/sim/health", json={"healthy": False}) as r:
        assert r.status == 200
    for path in ("/health", "/"):
        async with http.get(sim.url + path) as r:
            assert r.status == 503
            body = await r.json()
            tgi_schemas.check("ErrorResponse", body)
            assert body == {"error": "unhealthy", "error_type": "healthcheck"}
    async with http.post(sim.url + "/sim/health", json={"healthy": True}) as r:
        assert r.status == 200
    async with http.get(sim.url + "/health") as r:
        assert r.status == 200
    async with http.get(sim.url + "/v1/models") as r:
        models = await r.json()
    tgi_schemas.check("ModelInfo", models["data"][0])


async def test_metrics_are_tgi_named_and_count(sim: SimTGI, http: aiohttp.ClientSession) -> None:
    for _ in range(2):
        async with http.post(sim.url + "/generate", json={"inputs": "m", "parameters": {"max_new_tokens": 2}}) as r:
            assert r.status == 200
    async with http.post(sim.url + "/generate", json={"inputs": "m", "parameters": {"top_k": 0}}) as r:
        assert r.status == 422
    async with http.get(sim.url + "/metrics") as r:
        text = await r.text()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples["tgi_request_count"] == "3"
    assert samples["tgi_request_success"] == "2"
    assert samples['tgi_request_failure{err="validation"}'] == "1"
    assert samples['tgi_batch_inference_count{method="prefill"}'] == "2"
    assert int(samples['tgi_batch_inference_count{method="decode"}']) >= 1
    assert samples["tgi_queue_size"] == "0" and samples["tgi_batch_current_size"] == "0"
    assert "# TYPE tgi_request_count counter" in text and "# TYPE tgi_queue_size gauge" in text


LONG = "abcd" * 1030  # 1,031 tokens with BOS: over max_input_tokens, and over max_total_tokens with 1,024 new ones


@pytest.mark.parametrize(
    ("inputs", "parameters", "message"),
    [
        ("hi", {"temperature": 0}, "`temperature` must be strictly positive"),
        ("hi", {"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
        ("hi", {"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ("hi", {"top_n_tokens": 9}, "`top_n_tokens` must be >= 0 and <= 5. Given: 9"),
        ("", {}, "`inputs` cannot be empty"),
        (LONG, {"max_new_tokens": 5}, "`inputs` must have less than 1024 tokens. Given: 1031"),
        (
            LONG,
            {"max_new_tokens": 1024},
            "`inputs` tokens + `max_new_tokens` must be <= 2048. Given: 1031 `inputs` tokens and 1024 `max_new_tokens`",
        ),
    ],
)
async def test_validation_errors_on_the_wire(
    sim: SimTGI, http: aiohttp.ClientSession, tgi_schemas, inputs: str, parameters: dict, message: str
) -> None:
    body = {"inputs": inputs, "parameters": parameters}
    async with http.post(sim.url + "/generate", json=body) as r:
        assert r.status == 422
        out = await r.json()
    tgi_schemas.check("ErrorResponse", out)
    assert out["error_type"] == "validation"
    assert out["error"] == "Input validation error: " + message
    # a stream never fails with a status: HTTP 200 and one error event, then the stream ends
    async with http.post(sim.url + "/generate_stream", json=body) as r:
        assert r.status == 200
        (event,) = sse_events(await r.read())
    assert json.loads(event) == out


async def test_stream_only_rules_and_body_rejections(sim: SimTGI, http: aiohttp.ClientSession) -> None:
    cases = [
        ({"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
        ({"decoder_input_details": True}, "`decoder_input_details` == true is not supported when streaming tokens"),
    ]
    for parameters, message in cases:
        async with http.post(sim.url + "/generate_stream", json={"inputs": "x", "parameters": parameters}) as r:
            (event,) = sse_events(await r.read())
        assert json.loads(event) == {"error": f"Input validation error: {message}", "error_type": "validation"}

    headers = {"Content-Type": "application/json"}
    for path in ("/generate", "/generate_stream"):
        async with http.post(sim.url + path, data=b'{"inputs": ', headers=headers) as r:
            assert r.status == 400 and r.content_type == "text/plain"
            assert (await r.text()).startswith("Failed to parse the request body as JSON: EOF while parsing")
        async with http.post(sim.url + path, data=b'{"input": "x"}', headers=headers) as r:
            assert r.status == 422 and r.content_type == "text/plain"
            assert await r.text() == "Failed to deserialize the JSON body into the target type: missing field `inputs`"
        async with http.post(sim.url + path, data=b'{"inputs": "x"}') as r:
            assert r.status == 415
            assert await r.text() == "Expected request with `Content-Type: application/json`"


@pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning")
async def test_text_generation_client_parses_everything(sim: SimTGI, tgi_schemas) -> None:
    client = text_generation.AsyncClient(sim.url)
    response = await client.generate("Client test", max_new_tokens=4, decoder_input_details=True, top_n_tokens=3)
    assert isinstance(response, text_generation.types.Response)
    assert response.details.generated_tokens == 4 and len(response.details.top_tokens) == 4
    assert response.details.prefill[0].logprob is None
    streamed = [r async for r in client.generate_stream("Client test", max_new_tokens=4)]
    assert all(isinstance(r, text_generation.types.StreamResponse) for r in streamed)
    assert streamed[-1].generated_text == response.generated_text  # greedy: same text, streamed or not
    assert streamed[-1].details.finish_reason == text_generation.types.FinishReason.Length

    sampled = await client.generate("Client test", max_new_tokens=3, do_sample=True, seed=1234)
    assert sampled.details.seed == 1234
    assert (await client.generate("Client test", max_new_tokens=3, do_sample=True, seed=1234)) == sampled

    best = await client.generate("Best of", max_new_tokens=3, best_of=2, do_sample=True)
    assert len(best.details.best_of_sequences) == 1 and best.details.seed is not None

    with pytest.raises(tg_errors.ValidationError, match=re.escape("`top_n_tokens` must be >= 0 and <= 5. Given: 6")):
        await client.generate("x", max_new_tokens=2, top_n_tokens=6)
    with pytest.raises(tg_errors.ValidationError, match="`stop` supports up to 4 stop sequences"):
        async for _ in client.generate_stream("x", max_new_tokens=2, stop_sequences=list("abcde")):
            pass
    with pytest.raises(tg_errors.GenerationError, match="Request failed during generation"):
        await client.generate("[[sim:error_after=1]] x", max_new_tokens=5)

    # the synchronous client too (it blocks, so it runs in a thread while the server runs here)
    sync = text_generation.Client(sim.url)
    result = await asyncio.to_thread(sync.generate, "Client test", max_new_tokens=4)
    assert result.generated_text == response.generated_text


async def test_request_id_header_is_recorded(sim: SimTGI, http: aiohttp.ClientSession) -> None:
    headers = {"x-request-id": "gw-123"}
    async with http.post(
        sim.url + "/generate", json={"inputs": "id", "parameters": {"max_new_tokens": 2}}, headers=headers
    ):
        pass
    async with http.get(sim.url + "/sim/truth", params={"request_id": "gw-123"}) as r:
        truth = await r.json()
    assert list(truth["requests"]) == ["gw-123"]
    entry = truth["requests"]["gw-123"]
    assert entry["generated_tokens"] == 2 and entry["finish_reason"] == "length"
    assert entry["prompt_tokens"] == tokenizer.count_tokens("id")
    assert entry["prefill_mj"] > 0 and entry["decode_mj"] > 0


async def test_openai_completions(sim: SimTGI, http: aiohttp.ClientSession, tgi_schemas) -> None:
    body = {"prompt": "Complete this", "max_tokens": 4, "temperature": 0}
    async with http.post(sim.url + "/v1/completions", json=body) as r:
        assert r.status == 200
        final = await r.json()
    tgi_schemas.check("CompletionFinal", final)
    assert final["object"] == "text_completion"
    usage = final["usage"]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] == tokenizer.count_tokens("Complete this")
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4

    async with http.post(sim.url + "/v1/completions", json={**body, "stream": True}) as r:
        payloads = sse_events(await r.read())
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks[:-1]:
        tgi_schemas.check("Chunk", chunk)
        assert chunk["choices"][0]["finish_reason"] == ""
    tgi_schemas.check("CompletionFinal", chunks[-1])
    assert chunks[-1]["usage"] == usage
    assert "".join(c["choices"][0]["text"] for c in chunks) == final["choices"][0]["text"]

    async with http.post(sim.url + "/v1/completions", json={**body, "suffix": "x"}) as r:
        assert r.status == 422 and (await r.json())["error_type"] == "suffix not supported"
    async with http.post(sim.url + "/v1/completions", json={**body, "prompt": ["a"] * 5}) as r:
        assert r.status == 422 and (await r.json())["error_type"] == "batch size exceeded"
    async with http.post(sim.url + "/v1/completions", json={**body, "prompt": ["a", "b"]}) as r:
        two = await r.json()
    assert [c["index"] for c in two["choices"]] == [0, 1] and two["usage"]["completion_tokens"] == 8


async def test_openai_chat(sim: SimTGI, http: aiohttp.ClientSession, tgi_schemas) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    body = {"messages": messages, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    async with http.post(sim.url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200
        completion = await r.json()
    tgi_schemas.check("ChatCompletion", completion)
    assert completion["object"] == "chat.completion"
    choice = completion["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["logprobs"]["content"]) == 3
    prompt_tokens = tokenizer.count_tokens("Be brief.\nHi", add_special_tokens=False)  # the trivial template
    assert completion["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 3,
        "total_tokens": prompt_tokens + 3,
    }

    stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with http.post(sim.url + "/v1/chat/completions", json=stream_body) as r:
        payloads = sse_events(await r.read())
    assert payloads[-1] == b"[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    for chunk in chunks:
        tgi_schemas.check("ChatCompletionChunk", chunk)
    *token_chunks, usage_chunk = chunks
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None, None, "length"]
    assert all(c["usage"] is None for c in token_chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == completion["usage"]
    text = "".join(c["choices"][0]["delta"]["content"] for c in token_chunks)
    assert text == choice["message"]["content"]

    async with http.post(sim.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
        payloads = sse_events(await r.read())
    assert len(payloads) == 4  # no usage chunk without stream_options.include_usage

    bad = {"messages": [{"role": "user", "content": "[[sim:error_after=1]]"}], "max_tokens": 5, "stream": True}
    async with http.post(sim.url + "/v1/chat/completions", json=bad) as r:
        payloads = sse_events(await r.read())
    assert payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])
    assert error["error"]["http_status_code"] == 422
    assert error["error"]["message"].startswith("Request failed during generation")


async def test_silent_streams_get_axums_keepalive_comment(
    make_sim, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sim import server, wire

    monkeypatch.setattr(wire, "KEEPALIVE_INTERVAL_S", 0.03)  # axum: 15 s
    monkeypatch.setattr(server, "KEEPALIVE_TICK_S", 0.01)
    sim = await make_sim(time_scale=10)  # ~100 ms between tokens
    async with http.post(
        sim.url + "/generate_stream", json={"inputs": "slow", "parameters": {"max_new_tokens": 3}}
    ) as r:
        body = await r.read()
    frames = body[:-2].split(b"\n\n")
    assert b":" in frames  # an empty SSE comment, ignored by clients
    data = [f for f in frames if f != b":"]
    assert len(data) == 3 and all(f.startswith(b"data:{") for f in data)
