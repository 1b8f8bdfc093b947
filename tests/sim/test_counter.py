"""The simulated GPU's energy counter (NVML's cadence and lag) and its truth, over HTTP and in process."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

import aiohttp
import pytest

from meter.sources.sim import SimSource
from sim.ledger import PJ_PER_MJ
from sim.server import SimTGI
from tests.sim.conftest import SimFactory, sse_events
from tests.waiting import wait_until_async

PERIOD_NS = 100_000_000
IDLE_MW = 80_000


@pytest.mark.parametrize("lag_ms", [0, 200])
async def test_counter_steps_at_100ms_boundaries_and_lags(
    make_sim: SimFactory, http: aiohttp.ClientSession, lag_ms: int
) -> None:
    sim = await make_sim(counter_lag_ms=lag_ms)
    t0 = sim.gpu.t0_ns
    readings = []
    deadline = time.monotonic() + 0.45
    while time.monotonic() < deadline:
        async with http.get(sim.url + "/sim/energy") as r:
            readings.append(await r.json())
        await asyncio.sleep(0.007)
    by_boundary: dict[int, set[int]] = {}
    for reading in readings:
        assert reading["device"] == f"sim:{sim.url}"
        assert (reading["update_period_ms"], reading["lag_ms"]) == (100, lag_ms)
        boundary = (reading["t_ns"] - lag_ms * 1_000_000) // PERIOD_NS * PERIOD_NS
        # idle only: exactly 80 W since the GPU started, up to the boundary
        assert reading["energy_mj"] == max(boundary - t0, 0) * IDLE_MW // PJ_PER_MJ
        by_boundary.setdefault(boundary, set()).add(reading["energy_mj"])
    assert len(by_boundary) >= 4
    assert all(len(values) == 1 for values in by_boundary.values())  # it moves only when a boundary passes
    steps = sorted((b, values.pop()) for b, values in by_boundary.items())
    for (b1, e1), (b2, e2) in itertools.pairwise(steps):
        if b1 > t0:
            assert e2 - e1 == (b2 - b1) * IDLE_MW // PJ_PER_MJ  # 8 J per 100 ms


async def test_counter_matches_truth_after_traffic(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(counter_lag_ms=100)
    before = sim.gpu.counter()
    bodies = [{"inputs": f"load {i}", "parameters": {"max_new_tokens": 30}} for i in range(4)]
    await asyncio.gather(*(http.post(sim.url + "/generate", json=b) for b in bodies))
    during = sim.gpu.counter()
    # the work shows up in the counter only once its boundary is `lag` old
    await asyncio.sleep(0.25)
    t = time.time_ns()
    reading = sim.gpu.counter(t_ns=t)
    truth = sim.gpu.truth(t_ns=t)
    boundary = sim.gpu.counter_boundary_ns(t)
    assert boundary <= t - 100_000_000
    idle_since_boundary_pj = IDLE_MW * (t - boundary)  # the engine has been idle since before the boundary
    assert reading.energy_mj == (truth.total_pj - idle_since_boundary_pj) // PJ_PER_MJ
    assert before.energy_mj <= during.energy_mj <= reading.energy_mj <= truth.total_mj
    # active power is far above idle: the counter saw more than idle energy alone
    assert reading.energy_mj > (boundary - sim.gpu.t0_ns) * IDLE_MW // PJ_PER_MJ + 1000


async def test_truth_adds_up_under_mixed_traffic(make_sim: SimFactory, http: aiohttp.ClientSession) -> None:
    sim = await make_sim(time_scale=0.2)

    async def generate(rid: str, inputs: str, n: int) -> int:
        async with http.post(
            sim.url + "/generate",
            json={"inputs": inputs, "parameters": {"max_new_tokens": n}},
            headers={"x-request-id": rid},
        ) as r:
            return r.status

    async def stream(rid: str, inputs: str, n: int, read_events: int | None = None) -> None:
        body = {"inputs": inputs, "parameters": {"max_new_tokens": n}}
        r = await http.post(sim.url + "/generate_stream", json=body, headers={"x-request-id": rid})
        if read_events is None:
            sse_events(await r.read())
        else:
            seen = 0
            while seen < read_events:
                line = await r.content.readline()
                seen += line.startswith(b"data:")
            r.close()

    await asyncio.gather(
        generate("g-short", "short prompt", 5),
        generate("g-long", "a much longer prompt " * 20, 40),
        generate("g-error", "[[sim:error_after=4]] x", 10),
        stream("s-eos", "[[sim:eos_after=6]] y", 20),
        stream("s-cut", "leave early", 500, read_events=5),
        stream("s-full", "stream it", 25),
    )

    def all_finished() -> bool:  # s-cut's client left: the simulator finishes it once it sees the disconnect
        requests = sim.truth().requests
        return len(requests) == 6 and all(r.finish_reason for r in requests.values())

    await wait_until_async(all_finished, 5.0)
    async with http.get(sim.url + "/sim/truth") as r:
        truth = await r.json()
    requests = truth["requests"]
    parts = sum(e["prefill_mj"] + e["decode_mj"] for e in requests.values())
    assert parts + truth["idle_mj"] == truth["total_mj"]
    assert truth["idle_mj"] > 0 and all(e["prefill_mj"] > 0 for e in requests.values())
    assert requests["g-short"]["generated_tokens"] == 5 and requests["g-short"]["finish_reason"] == "length"
    assert requests["g-error"]["finish_reason"] == "error" and requests["g-error"]["generated_tokens"] == 4
    assert requests["s-eos"]["finish_reason"] == "eos_token" and requests["s-eos"]["generated_tokens"] == 6
    assert requests["s-cut"]["finish_reason"] == "cancelled" and 5 <= requests["s-cut"]["generated_tokens"] < 500
    assert requests["s-full"]["generated_tokens"] == 25
    # more prompt tokens, more prefill energy (they were prefilled together or alone at the same power)
    assert requests["g-long"]["prompt_tokens"] > requests["g-short"]["prompt_tokens"]
    # finished requests are frozen: asking again (or for one id) gives the same numbers
    for rid, entry in requests.items():
        async with http.get(sim.url + "/sim/truth", params={"request_id": rid}) as r:
            assert (await r.json())["requests"] == {rid: entry}
    assert json.loads(json.dumps(truth))["total_mj"] >= truth["idle_mj"]


async def test_meter_sim_source_reads_the_simulator(sim: SimTGI) -> None:
    await asyncio.sleep(0.15)  # past the first boundary after start: whole 100 ms steps from here on
    source = await asyncio.to_thread(SimSource, [sim.url])
    try:
        assert source.devices == (sim.device,)
        (first,) = await asyncio.to_thread(source.read)
        await asyncio.sleep(0.25)
        (second,) = await asyncio.to_thread(source.read)
    finally:
        source.close()
    assert first.error is None and second.error is None
    assert first.device == second.device == sim.device
    # 80 W idle: ~8 J per 100 ms step; 150-250 ms apart the counter moved by 1 to 3 steps
    assert (second.energy_mj - first.energy_mj) in {8000, 16000, 24000}
    assert source.counter_info(sim.device).update_period_ms == 100
