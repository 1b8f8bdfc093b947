"""sim.replay: the virtual-clock replay schedules like the live simulator, integrates energy exactly (both cost
models), records timelines and counter readings as the gateway and the sampler would, and refuses bad traces."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sim.batching
from sim.config import SimConfig
from sim.costmodel import COST_MODELS, with_cost_model
from sim.replay import Replay, Sampler, TraceRequest, replay
from sim.validation import GenerateParameters, GenerateRequest, validate
from tests.sim.conftest import SimFactory
from tests.waiting import wait_until_async

MS = 1_000_000
S = 1_000_000_000
T0 = 1_700_000_000 * S


def _check_consistent(rep: Replay, trace: list[TraceRequest]) -> None:
    """What every replay must satisfy."""
    assert {t.request_id for t in rep.timelines} == {r.request_id for r in trace}
    assert sum(p + d for p, d in rep.truth_pj.values()) + rep.idle_pj == rep.energy_pj  # to the picojoule
    assert rep.idle_pj >= 0 and rep.above_idle_pj >= 0
    times = [r.t_ns for r in rep.readings]
    assert times == sorted(set(times))
    energies = [r.energy_mj for r in rep.readings]
    assert energies == sorted(energies)
    if rep.readings:
        assert energies[-1] * 10**9 <= rep.energy_pj
    for t in rep.timelines:
        assert t.released_ns is not None and rep.start_ns <= t.released_ns <= t.done_ns <= rep.last_activity_ns
        assert t.backend is not None


def _lone_energy_pj(config: SimConfig, prompt: int, new: int) -> tuple[int, int]:
    """(prefill, decode) pJ of a request alone on the board, from the cost model's formulas written out again."""
    prefill_w = config.prefill_power_w + config.prefill_power_w_per_1k_tokens * prompt / 1000
    prefill_ns = round((config.prefill_overhead_ms / 1000 + prompt / config.prefill_tokens_per_s) * S)
    prefill_pj = round(min(prefill_w, config.max_power_w) * 1000) * prefill_ns
    decode_pj = 0
    for generated in range(1, new):  # the first token comes out of the prefill
        context = prompt + generated
        step_ms = (
            config.decode_step_ms
            + config.decode_per_request_ms
            + config.decode_context_ms_per_1k_tokens * context / 1000
        )
        watts = (
            config.decode_base_power_w
            + config.decode_power_per_request_w
            + config.decode_context_power_w_per_1k_tokens * context / 1000
        )
        decode_pj += round(min(watts, config.max_power_w) * 1000) * round(step_ms * MS)
    return prefill_pj, decode_pj


@pytest.mark.parametrize("model", list(COST_MODELS))
@pytest.mark.parametrize(("prompt", "new"), [(16, 1), (16, 40), (1000, 40)])
def test_a_lone_request_costs_exactly_what_the_cost_model_says(model: str, prompt: int, new: int) -> None:
    config = with_cost_model(SimConfig(), model)
    rep = replay([TraceRequest("r", "t", 500 * MS, prompt, new)], config, start_ns=T0, tail_ns=S)
    prefill_pj, decode_pj = _lone_energy_pj(config, prompt, new)
    assert rep.truth_pj["r"] == (prefill_pj, decode_pj)
    busy_ns = rep.last_activity_ns - (T0 + 500 * MS)
    assert rep.idle_pj == round(config.idle_power_w * 1000) * (rep.end_ns - rep.start_ns - busy_ns)
    (tl,) = rep.timelines
    assert tl.released_ns == T0 + 500 * MS and tl.generated_tokens == new and tl.status == "OK"
    assert tl.done_ns == rep.last_activity_ns
    assert rep.prefill_steps == 1 and rep.decode_steps == new - 1


def test_decode_costs_grow_with_context_only_in_the_misspecified_model() -> None:
    def decode_pj(model: str, prompt: int) -> int:
        rep = replay([TraceRequest("r", "t", 0, prompt, 50)], with_cost_model(SimConfig(), model), start_ns=0)
        return rep.truth_pj["r"][1]

    assert decode_pj("default", 16) == decode_pj("default", 1000)
    assert decode_pj("misspecified", 1000) > 1.02 * decode_pj("misspecified", 16)  # 3 % at batch 1


@st.composite
def traces(draw: st.DrawFn) -> list[TraceRequest]:
    n = draw(st.integers(1, 12))
    out = []
    for i in range(n):
        leave = draw(st.one_of(st.none(), st.integers(0, 400)))
        out.append(
            TraceRequest(
                request_id=f"r{i}",
                tenant=draw(st.sampled_from("abc")),
                arrival_ns=draw(st.integers(0, 600)) * MS,
                prompt_tokens=draw(st.integers(1, 1000)),
                new_tokens=draw(st.integers(1, 60)),
                cancel_after_ns=None if leave is None else leave * MS,
                deadline_after_ns=draw(st.one_of(st.none(), st.integers(0, 400).map(lambda x: x * MS))),
                fail_at_prefill=draw(st.booleans()),
            )
        )
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    traces(),
    st.sampled_from(list(COST_MODELS)),
    st.booleans(),
    st.integers(0, 300),
    st.integers(0, 50),
)
def test_replays_conserve_energy_and_repeat_exactly(trace, model, chunking, lag_ms, jitter_ms) -> None:
    config = with_cost_model(
        SimConfig(
            counter_lag_ms=lag_ms,
            prefill_chunking=chunking,
            max_batch_prefill_tokens=1024 if chunking else 4096,
            waiting_served_ratio=1.2,
            max_waiting_tokens=5,
        ),
        model,
    )
    sampler = Sampler(jitter_ns=jitter_ms * MS, seed=lag_ms)
    rep = replay(trace, config, start_ns=T0, sampler=sampler)
    _check_consistent(rep, trace)
    assert replay(list(reversed(trace)), config, start_ns=T0, sampler=sampler) == rep  # input order is irrelevant
    by_id = {r.request_id: r for r in trace}
    for tl in rep.timelines:
        r = by_id[tl.request_id]
        leave = r.leave()
        if tl.status == "OK":
            assert tl.generated_tokens == r.new_tokens and not r.fail_at_prefill
        elif tl.status == "INTERNAL":
            assert r.fail_at_prefill and tl.first_token_ns is None and tl.generated_tokens == 0
        else:
            assert leave is not None and tl.status == leave[1]
            assert tl.done_ns == T0 + r.arrival_ns + leave[0]
            assert tl.generated_tokens < r.new_tokens or leave[0] == 0
    # the counter shows the exact integral up to the last 100 ms boundary at least `lag` old
    for reading in rep.readings:
        assert reading.t_ns - T0 <= rep.end_ns - T0
    assert rep.readings[-1].energy_mj <= rep.energy_pj // 10**9


def test_a_client_that_leaves_mid_prefill_leaves_its_step_running_to_its_end() -> None:
    config = SimConfig()
    # a 1000-token prefill takes 55 ms; the client leaves after 20 ms: the forward pass runs on, as an engine's does,
    # 55 ms at 650 W, all of it the request's, then idle; it gets no token
    gone = TraceRequest("gone", "t", 0, 1000, 10, cancel_after_ns=20 * MS)
    rep = replay([gone], config, start_ns=0, tail_ns=0)
    assert rep.truth_pj["gone"] == (650_000 * 55 * MS, 0)
    assert rep.last_activity_ns == 55 * MS
    (tl,) = rep.timelines
    assert (tl.status, tl.first_token_ns, tl.done_ns, tl.generated_tokens) == ("CANCELLED", None, 20 * MS, 0)
    # the old rule (finish_step_on_cancel off): the request left the step at once, which ended: 20 ms, then idle
    cut = replay([gone], dataclasses.replace(config, finish_step_on_cancel=False), start_ns=0, tail_ns=0)
    assert cut.truth_pj["gone"] == (650_000 * 20 * MS, 0) and cut.last_activity_ns == 20 * MS
    # a deadline before the cancel wins, with its own status
    both = TraceRequest("both", "t", 0, 1000, 10, cancel_after_ns=30 * MS, deadline_after_ns=10 * MS)
    (tl,) = replay([both], config, start_ns=0).timelines
    assert (tl.status, tl.done_ns) == ("DEADLINE_EXCEEDED", 10 * MS)


def test_a_failure_at_prefill_costs_its_prefill_and_yields_no_token() -> None:
    rep = replay([TraceRequest("f", "t", 0, 100, 10, fail_at_prefill=True)], SimConfig(), start_ns=0)
    (tl,) = rep.timelines
    assert (tl.status, tl.first_token_ns, tl.generated_tokens) == ("INTERNAL", None, 0)
    assert rep.truth_pj["f"] == (650_000 * 10 * MS, 0)  # 5 ms + 100 / 20,000 s
    assert tl.done_ns == 10 * MS


def test_arrivals_at_one_instant_share_one_prefill_step() -> None:
    trace = [TraceRequest(f"r{i}", "t", 100 * MS, 10 + i, 5) for i in range(5)]
    rep = replay(trace, SimConfig(), start_ns=0)
    assert rep.prefill_steps == 1 and rep.decode_steps == 4
    assert len({t.first_token_ns for t in rep.timelines}) == 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ([TraceRequest("a", "t", 0, 10, 5), TraceRequest("a", "t", 5, 10, 5)], "appears twice"),
        ([TraceRequest("a", "t", -1, 10, 5)], "arrival_ns must be >= 0"),
        ([TraceRequest("a", "t", 0, 0, 5)], "prompt_tokens must be within 1..1024"),
        ([TraceRequest("a", "t", 0, 1025, 5)], "prompt_tokens must be within 1..1024"),
        ([TraceRequest("a", "t", 0, 1000, 1049)], "prompt + new <= 2048"),
        ([TraceRequest("a", "t", 0, 10, 0)], "new_tokens must be >= 1"),
        ([TraceRequest("a", "t", 0, 10, 5, cancel_after_ns=-1)], "cancel_after_ns must be >= 0"),
    ],
)
def test_bad_traces_are_refused_naming_the_request(bad: list[TraceRequest], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        replay(bad, SimConfig(), start_ns=0)


def test_sampler_reads_at_its_period_phase_and_jitter() -> None:
    rep = replay(
        [TraceRequest("r", "t", 0, 10, 5)],
        SimConfig(counter_lag_ms=100),
        start_ns=T0,
        end_ns=T0 + 2 * S,
        sampler=Sampler(period_ns=100 * MS, phase_ns=30 * MS, jitter_ns=4 * MS, seed=1),
    )
    offsets = [r.t_ns - T0 for r in rep.readings]
    assert len(offsets) == 20
    assert all(30 * MS + k * 100 * MS <= t < 34 * MS + k * 100 * MS for k, t in enumerate(offsets))
    assert len(set(offsets)) == len(offsets) and offsets != [30 * MS + k * 100 * MS for k in range(20)]
    with pytest.raises(ValueError, match="jitter_ns"):
        Sampler(jitter_ns=100 * MS)


async def test_the_live_simulator_schedules_like_the_replay(make_sim: SimFactory) -> None:
    """Both drive sim.batching's core: the same requests submitted together get the same steps and tokens, and
    (timer jitter aside) the same split of the energy."""
    config = SimConfig(time_scale=1.0)
    sim = await make_sim(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
    lengths = [(5, 30), (8, 12), (3, 45), (6, 7)]
    live = []
    for i, (words, new) in enumerate(lengths):
        valid = validate(
            GenerateRequest(inputs=" ".join(["word"] * words), parameters=GenerateParameters(max_new_tokens=new)),
            sim.config,
        )
        live.append(sim.scheduler.submit(valid, f"r{i}", stream=False))  # one tick: one prefill batch
    await wait_until_async(lambda: all(r.done for r in live), 10.0)
    trace = [TraceRequest(r.request_id, "t", 0, r.input_length, r.max_new_tokens) for r in live]
    rep = replay(trace, config, start_ns=0)
    assert (sim.scheduler.prefill_steps, sim.scheduler.decode_steps) == (rep.prefill_steps, rep.decode_steps)
    by_id = {t.request_id: t for t in rep.timelines}
    for r in live:
        assert len(r.tokens) == by_id[r.request_id].generated_tokens
    assert [r.request_id for r in sorted(live, key=lambda r: r.done_ns or 0)] == [
        t.request_id for t in sorted(rep.timelines, key=lambda t: t.done_ns)
    ]
    truth = sim.truth().requests
    live_total = sum(truth[r.request_id].total_mj for r in live)
    replay_total = sum(p + d for p, d in rep.truth_pj.values()) / 10**9
    assert replay_total == pytest.approx(live_total, rel=0.1)  # the live steps run ~1 ms late now and then
    for r in live:
        live_share = truth[r.request_id].total_mj / live_total
        replay_share = sum(rep.truth_pj[r.request_id]) / 10**9 / replay_total
        assert live_share == pytest.approx(replay_share, abs=0.05)


def test_the_core_is_clock_free() -> None:
    """The core takes every time from its driver (it imports no clock or event loop), so a replay at any origin
    gives the same result, shifted."""
    tree = ast.parse(inspect.getsource(sim.batching))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"time", "asyncio", "datetime", "threading"}
    trace = [TraceRequest(f"r{i}", "t", i * 7 * MS, 100, 20) for i in range(6)]
    a = replay(trace, SimConfig(), start_ns=0)
    b = replay(trace, SimConfig(), start_ns=T0)
    assert a.truth_pj == b.truth_pj and a.energy_pj == b.energy_pj
    assert [t.done_ns for t in a.timelines] == [t.done_ns - T0 for t in b.timelines]
