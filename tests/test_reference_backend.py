"""The reference backend (bench/gpu/reference_backend.py): TGI's API over transformers' continuous batching.

Two kinds of test:

- Pure ones, which always run: the invertible word tokenizer (counts as the simulator's, ids and texts round-trip)
  and ``Live``, which turns the engine's cumulative outputs into TGI's stopping rules.
- Server ones, which start ``python -m bench.gpu.reference_backend --tiny --device cpu`` as a subprocess: a real
  random-init Llama (2 layers, hidden 64, vocab 2048) on the CPU, driven over HTTP, once per engine: ``graph``
  (bench/gpu/graph_engine.py; needs torch) and ``cb`` (transformers' continuous-batching manager; needs torch,
  transformers and psutil). None of these is a joulegate dependency (transformers 5 needs huggingface_hub >= 1,
  which text-generation 0.7 excludes). The server runs with the interpreter named by ``JOULEGATE_REFERENCE_PYTHON``
  (a venv with torch==2.13.0 CPU, transformers==5.17.0, psutil, aiohttp, structlog), or with this one if it can
  import what the engine needs; otherwise that engine's tests are skipped.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.gpu.reference_backend import Live
from bench.gpu.reference_engine import EngineOutput
from bench.gpu.reference_tokenizer import WordTokenizer
from sim import tokenizer as sim_tokenizer
from sim.config import SimConfig
from sim.validation import GenerateParameters, GenerateRequest, validate
from tests.conftest import free_port
from tests.sim.conftest import TgiSchemas
from tests.waiting import wait_until_async

REPO = Path(__file__).resolve().parents[1]
TINY_VOCAB = 2048
LIMIT = 3  # --max-concurrent-requests of the test server
MAX_TOTAL = 512

# --- the tokenizer (always runs) ---

LLAMA = WordTokenizer(128_256)
TINY = WordTokenizer(TINY_VOCAB)


def test_llama_layout_of_special_ids() -> None:
    assert (LLAMA.regular, LLAMA.bos_id, LLAMA.eos_id) == (128_000, 128_000, 128_001)
    assert LLAMA.token(128_000).text == "<|begin_of_text|>" and LLAMA.token(128_001).text == "<|end_of_text|>"
    assert LLAMA.token(128_255).special and not LLAMA.token(127_999).special
    assert LLAMA.token(0).text == " 000" and LLAMA.token(1).text == " 001" and LLAMA.token(63).text == " 010"
    with pytest.raises(ValueError):
        LLAMA.token(128_256)
    with pytest.raises(ValueError):
        WordTokenizer(300)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_counts_and_offsets_match_the_simulator(text: str) -> None:
    tokens = TINY.encode(text)
    assert len(tokens) == sim_tokenizer.count_tokens(text) == TINY.count(text)
    assert [(t.start, t.stop, t.text) for t in tokens] == [
        (t.start, t.stop, t.text) for t in sim_tokenizer.encode(text)
    ]
    assert all(0 <= t.id < TINY.regular for t in tokens[1:])
    assert tokens[0].id == TINY.bos_id
    raw = text.encode("utf-8")
    assert b"".join(raw[t.start : t.stop] for t in tokens[1:]) == raw


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=LLAMA.regular - 1), max_size=40))
def test_generated_ids_round_trip_through_text(ids: list[int]) -> None:
    assert LLAMA.encode_ids(LLAMA.decode(ids), add_special_tokens=False) == ids


def test_special_ids_are_left_out_of_text_and_prompts_have_exact_lengths() -> None:
    assert TINY.decode([5, TINY.eos_id, 7]) == TINY.token(5).text + TINY.token(7).text
    assert TINY.decode([5, TINY.eos_id], skip_special_tokens=False).endswith("<|end_of_text|>")
    prompts = [TINY.prompt(n, salt) for n, salt in ((1, 0), (2, 1), (512, 2), (512, 3))]
    assert [len(TINY.encode(p)) for p in prompts] == [1, 2, 512, 512]
    assert TINY.encode_ids(prompts[2])[1] != TINY.encode_ids(prompts[3])[1]  # no shared prefix after BOS


# --- Live: the engine's cumulative outputs as TGI's stopping rules (always runs) ---


def _live(max_new_tokens: int = 5, stop: list[str] | None = None, eos_id: int | None = None) -> Live:
    params = GenerateParameters(max_new_tokens=max_new_tokens, stop=tuple(stop or ()))
    valid = validate(GenerateRequest(inputs="hello there", parameters=params), SimConfig(max_best_of=1))
    return Live("r1", valid, TINY, eos_id)


def _ids(*texts: str) -> list[int]:
    return [TINY.piece_id(t) for t in texts]


async def test_live_appends_only_new_tokens_and_ends_at_length() -> None:
    live = _live(max_new_tokens=3)
    live.on_output(EngineOutput(tokens=[10], logprobs=[-1.0], finished=False))
    live.on_output(EngineOutput(tokens=[10, 11], logprobs=[-1.0, -2.0], finished=False))
    assert live.take() == (1, [10, 11], False)
    live.on_output(EngineOutput(tokens=[10, 11, 12], logprobs=[-1.0, -2.0, -3.0], finished=True))
    assert live.take() == (3, [12], True)
    assert (live.finish_reason, live.engine_done, live.logprobs) == ("length", True, [-1.0, -2.0, -3.0])
    assert live.generated_text == TINY.decode([10, 11, 12])


async def test_live_stop_sequence_and_eos_end_before_the_engine() -> None:
    live = _live(max_new_tokens=10, stop=[" 00B 00C"])
    tokens = _ids(" 00A", " 00B", " 00C", " 00D")
    live.on_output(EngineOutput(tokens=tokens, logprobs=[], finished=False))
    assert (live.finish_reason, live.tokens, live.engine_done) == ("stop_sequence", tokens[:3], False)
    live.on_output(EngineOutput(tokens=[*tokens, 1], logprobs=[], finished=True))
    assert live.tokens == tokens[:3] and live.engine_done  # later outputs are ignored
    eos = _live(max_new_tokens=10, eos_id=TINY.eos_id)
    eos.on_output(EngineOutput(tokens=[3, TINY.eos_id], logprobs=[], finished=True))
    assert eos.finish_reason == "eos_token" and eos.generated_text == TINY.token(3).text


async def test_live_errors_and_short_finishes_are_failures() -> None:
    failed = _live()
    failed.on_output(EngineOutput(tokens=[1], logprobs=[], finished=True, error="CUDA out of memory"))
    assert (failed.error, failed.finish_reason, failed.done) == ("CUDA out of memory", None, True)
    short = _live(max_new_tokens=5)
    short.on_output(EngineOutput(tokens=[1, 2], logprobs=[], finished=True))
    assert short.error is not None and "2 of 5" in short.error
    waiting = _live()
    assert not await waiting.wait(0.01)
    waiting.fail("engine died")
    assert await waiting.wait(0.01) and waiting.error == "engine died"


# --- the server on a real (tiny) model ---


ENGINE_NEEDS = {"graph": ("torch",), "cb": ("torch", "transformers", "psutil")}


def _reference_python(engine: str) -> str | None:
    named = os.environ.get("JOULEGATE_REFERENCE_PYTHON")
    if named:
        return named
    if all(importlib.util.find_spec(m) is not None for m in ENGINE_NEEDS[engine]):
        return sys.executable
    return None


class RunningServer:
    def __init__(self, url: str, ready: dict[str, Any], proc: subprocess.Popen[bytes], log: list[bytes]) -> None:
        self.url = url
        self.ready = ready
        self.proc = proc
        self.log = log


@pytest.fixture(scope="module", params=sorted(ENGINE_NEEDS))
def server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    engine = request.param
    python = _reference_python(engine)
    if python is None:
        pytest.skip(f"{', '.join(ENGINE_NEEDS[engine])} not importable (set JOULEGATE_REFERENCE_PYTHON)")
    port = free_port()
    cmd = [python, "-m", "bench.gpu.reference_backend", "--engine", engine, "--tiny", "--device", "cpu"]
    cmd += ["--port", str(port)]
    cmd += ["--max-concurrent-requests", str(LIMIT), "--max-input-tokens", "256", "--max-total-tokens", str(MAX_TOTAL)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    assert proc.stdout is not None
    log: list[bytes] = []
    ready: dict[str, Any] | None = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        log.append(line)
        if line.startswith(b"READY "):
            ready = json.loads(line[6:])
            break
    if ready is None:
        proc.kill()
        pytest.fail("the reference backend did not start:\n" + b"".join(log).decode(errors="replace")[-3000:])
    threading.Thread(target=lambda: log.extend(proc.stdout or ()), daemon=True).start()
    yield RunningServer(ready["url"], ready, proc, log)
    proc.terminate()
    try:
        assert proc.wait(timeout=30) == 0, "the server did not stop cleanly on SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


@pytest.fixture(scope="module")
def schemas() -> TgiSchemas:
    return TgiSchemas()


def _events(body: bytes) -> list[dict[str, Any]]:
    assert body.endswith(b"\n\n")
    out = []
    for event in body[:-2].split(b"\n\n"):
        assert event.startswith(b"data:{") and b"\n" not in event, event  # axum's framing: no space, one line
        out.append(json.loads(event[5:]))
    return out


async def _stats(http: aiohttp.ClientSession, server: RunningServer) -> dict[str, Any]:
    async with http.get(server.url + "/reference/stats") as r:
        return await r.json()


async def _wait_idle(http: aiohttp.ClientSession, server: RunningServer) -> dict[str, Any]:
    async def idle() -> dict[str, Any] | None:
        stats = await _stats(http, server)
        engine = stats["engine"]
        quiet = stats["in_flight"] == 0 and engine["engine_active"] == 0 and engine["waiting_for_output"] == 0
        return stats if quiet else None

    return await wait_until_async(idle, 5.0, what="the engine to go idle")


async def test_info_health_and_tokenize(server: RunningServer, http: aiohttp.ClientSession, schemas) -> None:
    async with http.get(server.url + "/health") as r:
        assert r.status == 200
    async with http.get(server.url + "/info") as r:
        info = await r.json()
    schemas.check("Info", info)
    assert (info["max_concurrent_requests"], info["max_input_tokens"], info["max_total_tokens"]) == (LIMIT, 256, 512)
    assert info["max_best_of"] == 1 and info["model_pipeline_tag"] == "text-generation"
    assert server.ready["parameters"] > 0
    cache = server.ready["stats"]["kv_slots" if server.ready["engine"] == "graph" else "kv_blocks"]
    assert cache > 0
    text = "Energy per token, please 0123456789"
    async with http.post(server.url + "/tokenize", json={"inputs": text}) as r:
        tokens = await r.json()
    schemas.check("TokenizeResponse", tokens)
    assert [t["id"] for t in tokens] == TINY.encode_ids(text)
    assert tokens[0] == {"id": TINY.bos_id, "text": "", "start": 0, "stop": 0}
    assert "".join(t["text"] for t in tokens) == text


async def test_stream_is_tgi_shaped_and_exact(server: RunningServer, http: aiohttp.ClientSession, schemas) -> None:
    prompt = TINY.prompt(40, salt=1)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 12, "details": True}}
    async with http.post(server.url + "/generate_stream", json=body) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
        assert r.headers["x-compute-characters"] == str(len(prompt))
        events = _events(await r.read())
    for e in events:
        schemas.check("StreamResponse", e)
    assert [e["index"] for e in events] == list(range(1, 13))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    for e in events:
        token = e["token"]
        assert 0 <= token["id"] < TINY_VOCAB and isinstance(token["logprob"], float) and token["logprob"] <= 0
        assert (token["text"], token["special"]) == (TINY.token(token["id"]).text, TINY.token(token["id"]).special)
    final = events[-1]
    ids = [e["token"]["id"] for e in events]
    assert final["generated_text"] == TINY.decode(ids)
    assert final["details"] == {"finish_reason": "length", "generated_tokens": 12, "seed": None, "input_length": 40}
    # greedy on fixed weights: /generate gives the same tokens for the same prompt, with TGI's headers
    body["parameters"]["decoder_input_details"] = True
    async with http.post(server.url + "/generate", json=body) as r:
        assert r.status == 200
        out = await r.json()
        assert (r.headers["x-prompt-tokens"], r.headers["x-generated-tokens"]) == ("40", "12")
    schemas.check("GenerateResponse", out)
    assert [t["id"] for t in out["details"]["tokens"]] == ids and out["generated_text"] == final["generated_text"]
    assert [p["id"] for p in out["details"]["prefill"]] == TINY.encode_ids(prompt)
    # retokenizing the output gives the generated ids back (regular ids; a special one has no text)
    async with http.post(
        server.url + "/tokenize", json={"inputs": out["generated_text"], "add_special_tokens": False}
    ) as r:
        assert [t["id"] for t in await r.json()] == [i for i in ids if i < TINY.regular]


async def test_validation_errors_are_tgis(server: RunningServer, http: aiohttp.ClientSession) -> None:
    cases = [
        ({"max_new_tokens": 0}, "Input validation error: `max_new_tokens` must be strictly positive"),
        (
            {"max_new_tokens": 500},
            "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 512. "
            "Given: 21 `inputs` tokens and 500 `max_new_tokens`",
        ),
    ]
    for params, message in cases:
        body = {"inputs": TINY.prompt(21, salt=2), "parameters": params}
        async with http.post(server.url + "/generate", json=body) as r:
            assert r.status == 422
            assert await r.json() == {"error": message, "error_type": "validation"}
        async with http.post(server.url + "/generate_stream", json=body) as r:
            assert r.status == 200  # TGI refuses inside the stream
            assert _events(await r.read()) == [{"error": message, "error_type": "validation"}]
    async with http.post(server.url + "/generate", json={"inputs": TINY.prompt(300)}) as r:
        assert r.status == 422
        assert (await r.json())["error"].endswith("`inputs` must have less than 256 tokens. Given: 300")
    async with http.post(server.url + "/generate", data=b"{", headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await r.text()).startswith("Failed to parse the request body as JSON")
    assert (await _stats(http, server))["in_flight"] == 0


async def test_client_disconnect_cancels_in_the_engine(server: RunningServer, http: aiohttp.ClientSession) -> None:
    before = await _wait_idle(http, server)
    body = {"inputs": TINY.prompt(30, salt=3), "parameters": {"max_new_tokens": MAX_TOTAL - 30}}
    async with http.post(server.url + "/generate_stream", json=body) as r:
        seen = 0
        async for line in r.content:
            seen += line.startswith(b"data:")
            if seen == 3:
                break  # leaving the block closes the connection
    after = await _wait_idle(http, server)
    assert after["engine"]["cancelled"] == before["engine"]["cancelled"] + 1
    assert after["requests"]["dropped"] == before["requests"]["dropped"] + 1
    produced = after["engine"]["outputs"] - before["engine"]["outputs"]
    assert produced < 100, f"{produced} outputs for a request closed after 3 of {MAX_TOTAL - 30} tokens"
    await asyncio.sleep(0.2)
    assert (await _stats(http, server))["engine"]["outputs"] == after["engine"]["outputs"]  # the engine went quiet


async def test_overloaded_past_max_concurrent_requests(server: RunningServer, http: aiohttp.ClientSession) -> None:
    await _wait_idle(http, server)
    body = {"inputs": TINY.prompt(10, salt=4), "parameters": {"max_new_tokens": MAX_TOTAL - 10}}
    streams = [await http.post(server.url + "/generate_stream", json=body) for _ in range(LIMIT)]
    try:
        for s in streams:
            assert (await s.content.readline()).startswith(b'data:{"index":1')  # all admitted and generating
        overloaded = {"error": "Model is overloaded", "error_type": "overloaded"}
        async with http.post(server.url + "/generate", json={"inputs": "one more"}) as r:
            assert r.status == 429 and await r.json() == overloaded
        async with http.post(server.url + "/generate_stream", json={"inputs": "one more"}) as r:
            assert r.status == 200 and _events(await r.read()) == [overloaded]
        assert (await _stats(http, server))["requests"]["overloaded"] >= 2
    finally:
        for s in streams:
            s.close()
    await _wait_idle(http, server)
    async with http.post(server.url + "/generate", json={"inputs": "now there is room"}) as r:
        assert r.status == 200


async def test_stop_sequence_ends_the_request_in_the_engine(server: RunningServer, http: aiohttp.ClientSession) -> None:
    prompt = TINY.prompt(25, salt=5)
    body: dict[str, Any] = {"inputs": prompt, "parameters": {"max_new_tokens": 8, "details": True}}
    async with http.post(server.url + "/generate", json=body) as r:
        tokens = (await r.json())["details"]["tokens"]
    # a stop sequence spanning two consecutive tokens with text; the answer ends where it first appears
    k = next(k for k in range(1, 7) if not tokens[k]["special"] and not tokens[k + 1]["special"])
    stop = tokens[k]["text"] + tokens[k + 1]["text"]
    text, expected = "", 0
    for token in tokens:
        expected += 1
        text += "" if token["special"] else token["text"]
        if not token["special"] and text.endswith(stop):
            break
    before = await _wait_idle(http, server)
    body["parameters"]["stop"] = [stop]
    async with http.post(server.url + "/generate", json=body) as r:
        out = await r.json()
    assert out["generated_text"] == text and text.endswith(stop)
    assert (out["details"]["finish_reason"], out["details"]["generated_tokens"]) == ("stop_sequence", expected)
    after = await _wait_idle(http, server)
    assert after["engine"]["cancelled"] == before["engine"]["cancelled"] + (expected < 8)
