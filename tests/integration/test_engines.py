"""vLLM and SGLang behind the same gateway, over loopback: each simulated engine serves its own wire format (sim
``--engine``), the gateway finds the engine by probing (no setting), and the unchanged TGIS gRPC client and
``text_generation.Client`` work through it; every request gets its energy rows, and the books balance to the
millijoule. A mixed TGI + vLLM pool serves one model. A prompt whose prefix the engine had cached pays only for
the prefill it caused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from text_generation import Client
from text_generation import errors as tgi_errors

from proxy.pb.fmaas import generation_pb2 as pb
from sim import tokenizer
from sim.config import SimConfig
from sim.server import SimTGI
from tests.waiting import wait_until_async

from .harness import Stack, running_stack
from .metering_support import check_books, query, wait_attributed

METER = {"source": "sim", "epoch_s": 1.0, "settle_s": 0.5, "engine_interval_s": 0.2, "lag_ms": 50}
MODEL = "sim-model"
PROMPT = "Why is the sky blue? " * 8


@contextlib.asynccontextmanager
async def engines_stack(
    tmp_path: Path,
    engines: list[str],
    *,
    time_scale: float = 0.2,
    model: dict[str, Any] | None = None,
    meter: dict[str, Any] | None = None,
) -> AsyncIterator[Stack]:
    """Simulators of ``engines`` (one each), the gateway in front with only their URLs: it finds what they are.
    ``meter``: settings over ``METER``."""
    sims = [SimTGI(SimConfig(engine=e, time_scale=time_scale)) for e in engines]
    urls = [await s.start() for s in sims]
    try:
        async with running_stack(
            tmp_path, backend_urls=urls, http=True, overrides={"meter": {**METER, **(meter or {})}}, model=model
        ) as stack:
            stack.sims.extend(sims)
            yield stack
    finally:
        for s in sims:
            await s.stop()


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def _request_id(call: grpc.aio.UnaryUnaryCall | grpc.aio.UnaryStreamCall) -> str:
    return dict(await call.initial_metadata())["x-request-id"]


async def _metered_traffic(s: Stack) -> set[str]:
    """TGIS Generate (two texts) and GenerateStream, text_generation.Client generate and generate_stream; the ids
    of the gRPC requests."""
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=12))
    unary = s.stub.Generate(
        pb.BatchedGenerationRequest(
            model_id=MODEL, requests=[pb.GenerationRequest(text=PROMPT), pb.GenerationRequest(text="hello")],
            params=params,
        ),
        metadata=s.auth,
    )  # fmt: skip
    answer = await unary
    rid = await _request_id(unary)
    assert [r.generated_token_count for r in answer.responses] == [12, 12]
    assert [r.stop_reason for r in answer.responses] == [pb.MAX_TOKENS, pb.MAX_TOKENS]
    # the engine's own count of the prompt, through its usage (vLLM) or meta_info (SGLang)
    assert answer.responses[0].input_token_count == tokenizer.count_tokens(PROMPT)
    assert answer.responses[0].text and answer.responses[1].text

    stream = s.stub.GenerateStream(
        pb.SingleGenerationRequest(model_id=MODEL, request=pb.GenerationRequest(text=PROMPT), params=params),
        metadata=s.auth,
    )
    messages = [m async for m in stream]
    stream_id = await _request_id(stream)
    assert messages[0].input_token_count == tokenizer.count_tokens(PROMPT)  # first, as TGIS sends it
    assert messages[-1].stop_reason == pb.MAX_TOKENS and messages[-1].generated_token_count == 12
    streamed = "".join(m.text for m in messages)
    assert streamed == answer.responses[0].text  # greedy: the same text both ways

    client = Client(s.http_url, headers=_bearer(s.key))
    resp = await asyncio.to_thread(client.generate, PROMPT, max_new_tokens=7)
    assert resp.details is not None and resp.details.generated_tokens == 7 and resp.details.finish_reason == "length"
    events = await asyncio.to_thread(lambda: list(client.generate_stream(PROMPT, max_new_tokens=7)))
    assert events[-1].details is not None and events[-1].details.generated_tokens == 7
    assert events[-1].generated_text == resp.generated_text == "".join(e.token.text for e in events)
    return {f"{rid}-0", f"{rid}-1", stream_id}


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_engine_is_probed_served_and_metered(tmp_path: Path, engine: str) -> None:
    async with engines_stack(tmp_path, [engine]) as s:
        await s.app.pools[MODEL].check_all()
        (backend,) = s.app.pools[MODEL].backends
        assert backend.engine is not None and backend.engine.name == engine  # found by probing, no setting
        assert backend.info is not None and backend.info["max_total_tokens"] == s.sims[0].config.max_total_tokens

        ids = await _metered_traffic(s)
        assert s.app.ledger.flush(10.0)
        await wait_attributed(s.app.engine)
        db = s.app.engine
        rows = query(db, "SELECT request_id, prompt_tokens, generated_tokens, status FROM requests")
        assert len(rows) == 5 and {r[3] for r in rows} == {"OK"}
        by_id = {r[0]: r for r in rows}
        assert all(r[1] > 0 and r[2] > 0 for r in rows), rows  # the engine's counts, none estimated
        assert by_id[f"{min(ids)}"][1] in (tokenizer.count_tokens(PROMPT), tokenizer.count_tokens("hello"))
        energy = dict(query(db, "SELECT request_id, SUM(prefill_mj) + SUM(decode_mj) FROM request_energy GROUP BY 1"))
        assert set(energy) == set(by_id)  # every request has its energy rows
        assert all(mj > 0 for mj in energy.values()), energy
        totals = check_books(db)  # conservation to the millijoule
        assert set(totals) == {s.sims[0].url.removeprefix("http://")}
        for rid in ids:  # the truth knows them under the gateway's ids: the engine was sent x-request-id
            assert s.sims[0].truth(rid).requests


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_engine_errors_map_onto_the_front_doors(tmp_path: Path, engine: str) -> None:
    async with engines_stack(tmp_path, [engine], time_scale=0.0) as s:
        limit = s.sims[0].config.max_total_tokens
        long_prompt = "w" + " w" * (limit - 40)  # leaves about 38 tokens for generation
        # TGIS: too many new tokens for the model is not an error but a shorter answer (TOKEN_LIMIT), as TGIS does,
        # read from the engine's own context-length message
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=100))
        answer = await s.stub.Generate(
            pb.BatchedGenerationRequest(model_id=MODEL, requests=[pb.GenerationRequest(text=long_prompt)],
                                        params=params),
            metadata=s.auth,
        )  # fmt: skip
        (r,) = answer.responses
        assert r.stop_reason == pb.TOKEN_LIMIT
        assert r.input_token_count + r.generated_token_count == limit
        # a parameter the engine has no equivalent for: INVALID_ARGUMENT naming it
        bad = pb.Parameters(method=pb.SAMPLE, sampling=pb.SamplingParameters(typical_p=0.5))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.Generate(
                pb.BatchedGenerationRequest(model_id=MODEL, requests=[pb.GenerationRequest(text="x")], params=bad),
                metadata=s.auth,
            )
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "typical_p" in (err.value.details() or "")
        # over HTTP, the engine's context-length refusal is TGI's 422 validation error
        client = Client(s.http_url, headers=_bearer(s.key))
        with pytest.raises(tgi_errors.ValidationError, match="context length"):
            await asyncio.to_thread(client.generate, long_prompt, max_new_tokens=100)
        # a generation that fails mid-stream: TGI's in-stream error, INTERNAL over gRPC
        with pytest.raises(grpc.aio.AioRpcError) as err:
            call = s.stub.GenerateStream(
                pb.SingleGenerationRequest(
                    model_id=MODEL, request=pb.GenerationRequest(text="[[sim:error_after=2]] go"), params=params
                ),
                metadata=s.auth,
            )
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.INTERNAL, err.value.details()


async def test_mixed_tgi_and_vllm_pool_serves_one_model(tmp_path: Path) -> None:
    async with engines_stack(tmp_path, ["tgi", "vllm"]) as s:
        await s.app.pools[MODEL].check_all()
        found = sorted(b.engine.name for b in s.app.pools[MODEL].backends if b.engine is not None)
        assert found == ["tgi", "vllm"]
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=10))
        texts = [pb.GenerationRequest(text=PROMPT + str(i)) for i in range(4)]

        async def one_call() -> None:
            answer = await s.stub.Generate(
                pb.BatchedGenerationRequest(model_id=MODEL, requests=texts, params=params), metadata=s.auth
            )
            assert all(r.generated_token_count == 10 and r.stop_reason == pb.MAX_TOKENS for r in answer.responses)

        await asyncio.gather(*(one_call() for _ in range(6)))  # enough at once that both backends take some
        assert s.app.ledger.flush(10.0)
        await wait_attributed(s.app.engine)
        db = s.app.engine
        per_backend = dict(query(db, "SELECT backend, COUNT(*) FROM requests GROUP BY backend"))
        assert set(per_backend) == {sv.url.removeprefix("http://") for sv in s.sims}, per_backend
        energy = dict(query(db, "SELECT request_id, SUM(prefill_mj + decode_mj) FROM request_energy GROUP BY 1"))
        assert len(energy) == 24 and all(mj > 0 for mj in energy.values())
        totals = check_books(db)
        assert set(totals) == set(per_backend)


async def test_a_tenant_reusing_a_cached_prefix_pays_only_for_computed_prefill(tmp_path: Path) -> None:
    """vLLM's automatic prefix caching: the second prompt shares a long system prompt with the first, vLLM reports
    the hit (``usage.prompt_tokens_details.cached_tokens``), and the meter weighs the prefill by computed tokens.

    At twice real time: the cached prompt's prefill is the simulator's short fixed step, and a stall of the test's
    host of a few tens of milliseconds (the gateway then sees the first token late, and the meter counts the wait as
    prefill) was as long as the uncached prompt's whole prefill at real time (it failed a CI run once)."""
    async with engines_stack(tmp_path, ["vllm"], time_scale=2.0) as s:
        system = "You are a careful assistant. " * 120  # a long shared system prompt
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2))
        ids = []
        for question in ("first?", "second?"):
            call = s.stub.Generate(
                pb.BatchedGenerationRequest(
                    model_id=MODEL, requests=[pb.GenerationRequest(text=system + question)], params=params
                ),
                metadata=s.auth,
            )
            await call
            ids.append(await _request_id(call))
        assert s.app.ledger.flush(10.0)
        await wait_attributed(s.app.engine)
        db = s.app.engine
        prefill = dict(query(db, "SELECT request_id, SUM(prefill_mj) FROM request_energy GROUP BY 1"))
        cached = dict(query(db, "SELECT request_id, cached_tokens FROM requests"))
        truth = {rid: s.sims[0].truth(rid).requests[rid] for rid in ids}
        assert cached[ids[0]] == 0 and cached[ids[1]] > 0.9 * tokenizer.count_tokens(system)
        # the second prompt is ~98 % cached: its prefill is the step's fixed cost and a few tokens
        assert prefill[ids[1]] < 0.3 * prefill[ids[0]], prefill
        # and the truth agrees that the second's prefill cost a fraction of the first's (per-request accuracy against
        # the truth is test_metering_accuracy's: on a loaded machine one lone 60 ms prefill may be placed 100 ms off)
        assert truth[ids[1]].prefill_mj < 0.3 * truth[ids[0]].prefill_mj, truth


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_in_one_prefill_step_the_cached_prompt_pays_less(tmp_path: Path, engine: str) -> None:
    """Two tenants' prompts of the same length prefilled in one step (the shaper releases them together): one's prefix
    was cached, the other's not. Each pays its own share of the step, weighed by the tokens it made the GPU compute,
    not an equal half.

    The simulator runs 4x slower than an H100 and the meter's step model says so: which first tokens came out of one
    step is read from when the gateway saw them, and on a loaded 2-core host two tokens written together are seen up
    to ~7 ms apart (the process is preempted between the two streams); at real speed the cached prompt's own shortest
    step (5 ms) is within that jitter, 4x slower it is not."""
    together = {"shaping": {"classes": {"default": {"policy": "batch", "max_batch": 2, "hold_ms": 5000}}}}
    scale = 4.0
    step_model = {"prefill_overhead_ms": 5.0 * scale, "prefill_tokens_per_s": 20_000.0 / scale}
    async with engines_stack(tmp_path, [engine], time_scale=scale, model=together, meter=step_model) as s:
        from meter.store.keys import create_key

        key_b = create_key(s.app.engine, "tenant-b").key
        shared = "You are a careful assistant. " * 100
        other = "Answer in French, and briefly. " * 100
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=2))

        def call(text: str, key: str) -> grpc.aio.UnaryUnaryCall:
            return s.stub.Generate(
                pb.BatchedGenerationRequest(model_id=MODEL, requests=[pb.GenerationRequest(text=text)], params=params),
                metadata=(("authorization", f"Bearer {key}"),),
            )

        # warm the cache with tenant a's system prompt (two calls: the batch policy releases pairs)
        await asyncio.gather(call(shared + "warm?", s.key), call("w " * 5, key_b))
        cached_call, fresh_call = call(shared + "now?", s.key), call(other + "now?", key_b)
        await asyncio.gather(cached_call, fresh_call)
        cached_id, fresh_id = await _request_id(cached_call), await _request_id(fresh_call)
        assert s.app.ledger.flush(10.0)
        await wait_attributed(s.app.engine)
        db = s.app.engine
        rows = dict(query(db, "SELECT request_id, cached_tokens FROM requests"))
        assert rows[fresh_id] == 0 and rows[cached_id] > 0.9 * tokenizer.count_tokens(shared)
        truth = s.sims[0].truth()
        assert truth.requests[cached_id].prefill_mj < 0.2 * truth.requests[fresh_id].prefill_mj  # one step, shared
        prefill = dict(query(db, "SELECT request_id, SUM(prefill_mj) FROM request_energy GROUP BY 1"))
        assert prefill[cached_id] < 0.25 * prefill[fresh_id], prefill
        check_books(db)


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_openai_routes_through_the_engines_own(tmp_path: Path, engine: str) -> None:
    import openai

    async with engines_stack(tmp_path, [engine], time_scale=0.0) as s:
        async with openai.AsyncOpenAI(base_url=f"{s.http_url}/v1", api_key=s.key, max_retries=0) as client:
            messages = [{"role": "user", "content": "Why is the sky blue?"}]
            done = await client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
            assert done.model == MODEL and done.choices[0].finish_reason == "length"
            assert done.usage is not None and done.usage.completion_tokens == 5 and done.choices[0].message.content
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="tgi", messages=messages, max_tokens=5, temperature=0, stream=True
                )
            ]
            assert "".join(c.choices[0].delta.content or "" for c in chunks) == done.choices[0].message.content
            assert all(c.usage is None for c in chunks)  # the usage the gateway asked for, not the client
            text = await client.completions.create(model=MODEL, prompt=["Once upon", "a time"], max_tokens=4)
            assert [c.index for c in text.choices] == [0, 1] and text.usage is not None
            assert text.usage.completion_tokens == 8
            with pytest.raises(openai.UnprocessableEntityError) as err:  # the engine's context-length refusal
                await client.completions.create(model=MODEL, prompt="w " * 1500, max_tokens=1000)
            assert "context length" in err.value.response.text
        assert s.app.ledger.flush(10.0)
        rows = query(s.app.engine, "SELECT status, prompt_tokens, generated_tokens FROM requests ORDER BY 3")
        assert [(r[0], r[2]) for r in rows if r[0] == "OK"] == [("OK", 4), ("OK", 4), ("OK", 5), ("OK", 5)]
        assert all(r[1] > 0 for r in rows if r[0] == "OK")


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_a_cancelled_stream_leaves_the_engine_and_is_recorded(tmp_path: Path, engine: str) -> None:
    async with engines_stack(tmp_path, [engine], time_scale=1.0) as s:
        params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=500))
        call = s.stub.GenerateStream(
            pb.SingleGenerationRequest(model_id=MODEL, request=pb.GenerationRequest(text="cancel me"), params=params),
            metadata=s.auth,
        )
        got = 0
        async for _ in call:
            got += 1
            if got == 3:
                break
        call.cancel()
        await wait_until_async(lambda: s.sims[0].scheduler.batch_size == 0, 5.0, what="the engine to drop it")

        async def status() -> str | None:
            s.app.ledger.flush(1.0)
            rows = query(s.app.engine, "SELECT status, generated_tokens, prompt_tokens FROM requests")
            return rows[0][0] if rows else None

        assert await wait_until_async(status, 10.0, poll_s=0.05) == "CANCELLED"
        (row,) = query(s.app.engine, "SELECT status, generated_tokens, prompt_tokens FROM requests")
        assert 0 < row[1] < 500 and row[2] == tokenizer.count_tokens("cancel me")  # the engine's own count


async def test_a_backend_that_comes_back_as_another_engine_is_probed_again(tmp_path: Path) -> None:
    """A backend's engine and info were probed once, at its first answer: one restarted as vLLM on TGI's URL (a
    migration off TGI, one pod at a time) was still spoken TGI to, and every request failed on routes it lacks.
    Now a backend that went down is probed again when it answers again."""
    tgi = SimTGI(SimConfig(engine="tgi", time_scale=0.0, max_total_tokens=2048))
    url = await tgi.start()
    port = int(url.rsplit(":", 1)[1])
    vllm = SimTGI(SimConfig(engine="vllm", time_scale=0.0, max_input_tokens=512, max_total_tokens=1024))
    try:
        async with running_stack(tmp_path, backend_urls=[url], overrides={"meter": {"source": "none"}}) as s:
            pool = s.app.pools[MODEL]
            (backend,) = pool.backends
            request = pb.BatchedGenerationRequest(
                model_id=MODEL,
                requests=[pb.GenerationRequest(text=PROMPT)],
                params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=5)),
            )
            assert (await s.stub.Generate(request, metadata=s.auth)).responses[0].generated_token_count == 5
            assert backend.engine is not None and backend.engine.name == "tgi"
            await tgi.stop()
            await wait_until_async(lambda: not backend.healthy, 10.0, what="the backend to go down", poll_s=0.05)
            await vllm.start(port=port)
            await wait_until_async(lambda: backend.healthy, 10.0, what="the backend to come back", poll_s=0.05)
            assert backend.engine is not None and backend.engine.name == "vllm"
            assert backend.info is not None and backend.info["max_total_tokens"] == 1024
            assert (await s.stub.Generate(request, metadata=s.auth)).responses[0].generated_token_count == 5
            info = await s.stub.ModelInfo(pb.ModelInfoRequest(model_id=MODEL), metadata=s.auth)
            assert info.max_sequence_length == 1024
    finally:
        await vllm.stop()
        await tgi.stop()
