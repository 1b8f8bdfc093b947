"""The engine behaves like TGI's router under load: admission (429), in-stream errors, stopping, cancellation on
disconnect, continuous batching timing and energy, the waiting_served_ratio rule, the KV-cache budget."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from sim.scheduler import SimRequest
from sim.server import SimTGI
from sim.tokenizer import EOS_ID, EOS_TEXT
from sim.validation import GenerateParameters, GenerateRequest, validate
from tests.sim.conftest import SimFactory, sse_events
from tests.waiting import wait_until_async


async def _events(response: aiohttp.ClientResponse, n: int) -> list[dict]:
    """Read the first ``n`` SSE events of a stream that is still going."""
    out = []
    while len(out) < n:
        line = await response.content.readline()
        assert line, "stream ended early"
        if line.startswith(b"data:"):
            out.append(json.loads(line[5:]))
    return out


def _submit(sim: SimTGI, inputs: str, max_new_tokens: int, request_id: str) -> SimRequest:
    """Queue a request straight into the engine (no HTTP), so a test controls exactly when it arrives."""
    valid = validate(
        GenerateRequest(inputs=inputs, parameters=GenerateParameters(max_new_tokens=max_new_tokens)), sim.config
    )
    return sim.scheduler.submit(valid, request_id, stream=False)


async def test_overload_is_429_at_once_and_in_stream(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(max_concurrent_requests=2)
    long = {"inputs": "hold", "parameters": {"max_new_tokens": 1000}}
    holders = [await http.post(sim.url + "/generate_stream", json=long) for _ in range(2)]
    for holder in holders:
        await _events(holder, 1)  # both admitted and running
    t0 = time.monotonic()
    async with http.post(sim.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}) as r:
        assert r.status == 429
        assert await r.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    assert time.monotonic() - t0 < 0.5  # rejected, not queued
    async with http.post(sim.url + "/generate_stream", json={"inputs": "x"}) as r:
        assert r.status == 200
        (event,) = sse_events(await r.read())
        assert json.loads(event) == {"error": "Model is overloaded", "error_type": "overloaded"}
    for holder in holders:
        holder.close()  # the clients leave: their permits come back
    await wait_until_async(lambda: sim.infer.in_flight == 0, 5.0)
    async with http.post(sim.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}) as r:
        assert r.status == 200
    async with http.get(sim.url + "/metrics") as r:
        assert 'tgi_request_failure{err="overloaded"} 2' in await r.text()


async def test_error_marker_fails_in_stream_after_n_tokens(sim: SimTGI, http: aiohttp.ClientSession) -> None:
    body = {"inputs": "[[sim:error_after=3]] fail", "parameters": {"max_new_tokens": 10}}
    async with http.post(sim.url + "/generate_stream", json=body, headers={"x-request-id": "e1"}) as r:
        assert r.status == 200
        events = [json.loads(p) for p in sse_events(await r.read())]
    assert [e.get("index") for e in events[:3]] == [1, 2, 3]
    assert events[3]["error_type"] == "generation"
    assert events[3]["error"] == "Request failed during generation: Server error: simulated failure after 3 tokens"
    assert len(events) == 4
    async with http.post(sim.url + "/generate", json=body, headers={"x-request-id": "e2"}) as r:
        assert r.status == 424
        assert (await r.json())["error_type"] == "generation"
    truth = sim.truth()
    assert truth.requests["e1"].finish_reason == "error" and truth.requests["e1"].generated_tokens == 3
    assert truth.requests["e2"].generated_tokens == 3
    body = {"inputs": "[[sim:error_after=0]] fail", "parameters": {"max_new_tokens": 10}}
    async with http.post(sim.url + "/generate_stream", json=body) as r:
        (event,) = sse_events(await r.read())
    assert json.loads(event)["error_type"] == "generation"


async def test_eos_marker_and_stop_sequences(sim: SimTGI, http: aiohttp.ClientSession) -> None:
    body = {"inputs": "[[sim:eos_after=3]] go", "parameters": {"max_new_tokens": 10, "details": True}}
    async with http.post(sim.url + "/generate_stream", json=body) as r:
        events = [json.loads(p) for p in sse_events(await r.read())]
    assert len(events) == 3
    last = events[-1]
    assert last["token"] == {"id": EOS_ID, "text": EOS_TEXT, "logprob": -0.02, "special": True}
    assert last["details"]["finish_reason"] == "eos_token" and last["details"]["generated_tokens"] == 3
    assert last["generated_text"] == events[0]["token"]["text"] + events[1]["token"]["text"]  # EOS text skipped

    free = {"inputs": "Stop somewhere", "parameters": {"max_new_tokens": 12}}
    async with http.post(
        sim.url + "/generate", json={**free, "parameters": {"max_new_tokens": 12, "details": True}}
    ) as r:
        texts = [t["text"] for t in (await r.json())["details"]["tokens"]]
    stop = texts[6]
    expected = next(k for k in range(12) if "".join(texts[: k + 1]).endswith(stop)) + 1
    body = {"inputs": "Stop somewhere", "parameters": {"max_new_tokens": 12, "stop": [stop], "details": True}}
    async with http.post(sim.url + "/generate", json=body) as r:
        out = await r.json()
    assert out["details"]["finish_reason"] == "stop_sequence"
    assert out["details"]["generated_tokens"] == expected
    assert out["generated_text"] == "".join(texts[:expected]) and out["generated_text"].endswith(stop)


async def test_disconnect_cancels_at_once_and_stops_energy(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(time_scale=0.5)
    long = {"inputs": "cancel me", "parameters": {"max_new_tokens": 1000}}
    keep = await http.post(sim.url + "/generate_stream", json=long, headers={"x-request-id": "keep"})
    gone = await http.post(sim.url + "/generate_stream", json=long, headers={"x-request-id": "gone"})
    await _events(keep, 2)
    await _events(gone, 3)
    await wait_until_async(lambda: sim.scheduler.batch_size == 2, 5.0)
    gone.close()
    await wait_until_async(lambda: sim.truth("gone").requests["gone"].finish_reason == "cancelled", timeout_s=1.0)
    assert sim.scheduler.batch_size == 1  # it left the running batch
    # The step in flight when it left runs to its end with it (finish_step_on_cancel, as an engine's forward pass):
    # its share of that step is its own. From the next step on it gets nothing. A decode step here is ~5 ms.
    await asyncio.sleep(0.05)
    frozen = sim.truth("gone").requests["gone"]
    before_keep = sim.truth("keep").requests["keep"]
    await asyncio.sleep(0.15)
    after = sim.truth().requests
    assert after["gone"] == frozen  # no more tokens, no more energy
    assert after["keep"].generated_tokens > before_keep.generated_tokens
    assert after["keep"].decode_mj > before_keep.decode_mj
    keep.close()
    await wait_until_async(lambda: sim.scheduler.batch_size == 0, timeout_s=1.0)
    await wait_until_async(lambda: sim.gpu.phase == "idle", timeout_s=1.0)  # once the step in flight has ended

    # a non-streamed request is cancelled when its client gives up too
    timeout = aiohttp.ClientTimeout(total=0.2)
    try:
        await http.post(sim.url + "/generate", json=long, headers={"x-request-id": "impatient"}, timeout=timeout)
    except TimeoutError:
        pass
    else:
        raise AssertionError("a 1000-token request cannot finish in 0.2 s at this time scale")
    await wait_until_async(
        lambda: sim.truth("impatient").requests["impatient"].finish_reason == "cancelled", timeout_s=1.0
    )
    assert sim.infer.in_flight == 0


async def test_continuous_batching_shares_time_and_energy(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(time_scale=0.5)
    body = {"inputs": "same prompt for all", "parameters": {"max_new_tokens": 20}}

    async def one(rid: str) -> None:
        async with http.post(sim.url + "/generate", json=body, headers={"x-request-id": rid}) as r:
            assert r.status == 200

    t0 = time.monotonic()
    await one("solo")
    solo_s = time.monotonic() - t0
    t0 = time.monotonic()
    await asyncio.gather(*(one(f"batch-{i}") for i in range(8)))
    batch_s = time.monotonic() - t0
    assert batch_s < 2 * solo_s  # sequentially it would take 8x
    truth = sim.truth().requests
    solo_mj = truth["solo"].prefill_mj + truth["solo"].decode_mj
    batched = [truth[f"batch-{i}"].prefill_mj + truth[f"batch-{i}"].decode_mj for i in range(8)]
    # decode steps are shared: energy per request drops with batch size (the first arrival may have run alone for
    # a step or two before the others joined, so look at the typical request and the mean)
    assert sorted(batched)[4] < solo_mj / 4
    assert sum(batched) / 8 < solo_mj / 3
    assert all(truth[f"batch-{i}"].generated_tokens == 20 for i in range(8))


async def test_identical_requests_in_one_batch_cost_the_same(sim: SimTGI) -> None:
    requests = [_submit(sim, "twin prompt", 10, f"twin-{i}") for i in range(4)]  # same tick: one prefill batch
    await wait_until_async(lambda: all(r.done for r in requests), 5.0)
    truth = sim.truth().requests
    prefill = {truth[f"twin-{i}"].prefill_mj for i in range(4)}
    decode = {truth[f"twin-{i}"].decode_mj for i in range(4)}
    assert max(prefill) - min(prefill) <= 1 and max(decode) - min(decode) <= 1
    assert sim.scheduler.prefill_steps == 1


async def _late_join_wait(sim: SimTGI, late: int) -> int:
    """Decode steps that late arrivals wait before their prefill, while 4 requests decode."""
    running = [_submit(sim, "running batch", 25, f"run-{i}") for i in range(4)]
    await wait_until_async(
        lambda: all(r.first_token_ns is not None for r in running) and sim.scheduler.decode_steps >= 1, 5.0
    )
    newcomers = [_submit(sim, "late", 3, f"late-{i}") for i in range(late)]
    await wait_until_async(lambda: all(r.done for r in running + newcomers), 5.0)
    waits = {r.decode_steps_at_first_token - r.decode_steps_at_queue for r in newcomers}
    assert len(waits) == 1  # they were prefilled together
    return waits.pop()


async def test_waiting_served_ratio_decides_when_newcomers_interrupt(make_sim: SimFactory) -> None:
    # ratio 1.2, batch 4: fewer than floor(4 * 1.2) = 4 newcomers must wait for max_waiting_tokens decode steps
    # (real-time steps, ~10 ms, so that the newcomers surely arrive within the first decode steps)
    strict = await make_sim(time_scale=1.0, waiting_served_ratio=1.2, max_waiting_tokens=10)
    assert 5 <= await _late_join_wait(strict, late=2) <= 10
    # ... but 4 newcomers are enough to pause the running batch at once
    strict_many = await make_sim(time_scale=1.0, waiting_served_ratio=1.2, max_waiting_tokens=10)
    assert await _late_join_wait(strict_many, late=4) <= 1
    # TGI's default ratio 0.3: floor(4 * 0.3) = 1, so 2 newcomers join at the next step
    default = await make_sim(time_scale=1.0, max_waiting_tokens=10)
    assert default.config.waiting_served_ratio == 0.3
    assert await _late_join_wait(default, late=2) <= 1


async def test_kv_budget_holds_requests_back(make_sim: SimFactory) -> None:
    # each request reserves input + max_new_tokens - 1 = 3 + 1000 - 1 tokens: two fit in 2048, the third waits
    sim = await make_sim(time_scale=0.02, max_batch_total_tokens=2048)
    requests = [_submit(sim, "kv", 1000, f"kv-{i}") for i in range(3)]
    assert requests[0].valid.input_length == 2
    await wait_until_async(lambda: all(r.done for r in requests), timeout_s=10)
    first, second, third = requests
    assert first.start_ns == second.start_ns  # one prefill batch
    assert third.start_ns >= min(first.done_ns, second.done_ns)  # admitted only when memory was freed
    assert sim.scheduler.kv_free_tokens == 2048


async def test_prefill_chunking_splits_long_prompts_and_lets_newcomers_in(make_sim: SimFactory) -> None:
    sim = await make_sim(
        prefill_chunking=True,
        max_input_tokens=60,
        max_total_tokens=120,
        max_batch_prefill_tokens=64,
        max_batch_total_tokens=4096,
        waiting_served_ratio=1.2,  # ignored with chunking
    )
    prompt = "abcd" * 49  # 50 tokens with BOS
    a = _submit(sim, prompt, 5, "a")
    b = _submit(sim, prompt, 5, "b")
    assert a.valid.input_length == b.valid.input_length == 50
    await wait_until_async(lambda: a.done and b.done, 5.0)
    # forward 1: all of a (50) and 14 tokens of b; forward 2: b's other 36 tokens while a decodes its second token
    assert a.decode_steps_at_first_token == 0
    assert b.decode_steps_at_first_token == 1
    assert b.first_token_ns > a.first_token_ns
    assert sim.scheduler.prefill_steps == 2
    truth = sim.truth().requests
    assert truth["a"].generated_tokens == truth["b"].generated_tokens == 5
    # with chunking, two newcomers join the next forward even though floor(4 * 1.2) = 4 > 2
    assert await _late_join_wait(sim, late=2) <= 1


async def test_stop_drains_for_the_grace_period_then_cancels(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(time_scale=1.0)

    async def post(rid: str, n: int) -> int:
        body = {"inputs": "drain", "parameters": {"max_new_tokens": n}}
        async with http.post(sim.url + "/generate", json=body, headers={"x-request-id": rid}) as r:
            await r.read()
            return r.status

    short = asyncio.ensure_future(post("short", 15))  # ~0.15 s
    long = asyncio.ensure_future(post("long", 1000))  # ~10 s
    await wait_until_async(lambda: sim.scheduler.batch_size == 2, 5.0)
    t0 = time.monotonic()
    await sim.stop(grace_s=0.6)
    assert 0.1 < time.monotonic() - t0 < 2.0
    assert await short == 200  # finished within the grace period
    try:
        await long
    except aiohttp.ClientError:
        pass  # cut off: the connection closed
    else:
        raise AssertionError("a 10 s request cannot finish in a 0.6 s grace period")
    truth = sim.truth().requests
    assert truth["short"].finish_reason == "length"
    assert truth["long"].finish_reason == "cancelled"
    with pytest.raises(aiohttp.ClientConnectionError):
        await post("late", 1)  # no longer listening
