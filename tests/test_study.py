"""The study's arithmetic (bench/gpu/study_report.py, bench/gpu/energy_poll.py, the lane of bench/gpu/study.py).

The study's RESULT line is read next to a published paper, so each ratio must be the quantity it says: per-phase
joules from the gateway's reports over the right token counts (decode made ``generated - 1`` tokens per request),
phase power over the time the phase held the GPU (overlapping requests counted once), the idle floor taken out of
the bill only, and NaN, not a number, where a run is missing or incomplete.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.gpu.energy_poll import energy_between, update_points
from bench.gpu.study import QUICK, policies_for, shaping_lane
from bench.gpu.study_report import FixedRun, fixed_run, ratios, result_line, union_s
from bench.shaping_drive import ClientResult, RequestRow, WindowEnergy
from bench.shaping_report import PolicySpec, RunRow
from bench.shaping_runs import Scenario
from bench.shaping_trace import make_trace

MS = 1_000_000


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=12))
def test_union_counts_every_covered_instant_once(pairs: list[tuple[int, int]]) -> None:
    intervals = [(a * MS, b * MS) for a, b in pairs]
    covered = {t for a, b in pairs for t in range(a, b)}  # unit cells [t, t+1) of non-empty intervals
    assert union_s(intervals) == pytest.approx(len(covered) * MS / 1e9)


def _counter(power_w: float, period_ms: int, phase_ms: int, poll_ms: int, span_ms: int) -> list[tuple[int, int]]:
    """A counter that adds power x period at each update (every ``period_ms`` from ``phase_ms``), polled every
    ``poll_ms``: samples (t_ns, mJ)."""
    out = []
    for t in range(0, span_ms, poll_ms):
        updates = 0 if t < phase_ms else (t - phase_ms) // period_ms + 1
        out.append((t * MS, round(updates * power_w * period_ms)))
    return out


def test_polled_energy_recovers_a_steady_power_where_two_reads_would_not() -> None:
    samples = _counter(power_w=400.0, period_ms=100, phase_ms=37, poll_ms=20, span_ms=4000)
    assert len(update_points(samples)) == 41  # the first sample and the 40 updates at 37, 137, ..., 3937 ms
    start, end = 500 * MS + 3 * MS, 2500 * MS - 41 * MS  # 1.956 s at 400 W: 782.4 J
    assert energy_between(samples, start, end) == pytest.approx(782.4, rel=0.02)
    naive = (dict(samples)[2460 * MS] - dict(samples)[500 * MS]) / 1000  # two plain reads around the span
    assert abs(naive - 782.4) > 0.02 * 782.4  # what the interpolation is for
    assert math.isnan(energy_between(samples, 0, 5000 * MS))  # past the samples
    assert math.isnan(energy_between(samples, 2000 * MS, 1000 * MS))
    assert math.isnan(energy_between([], 0, 1))


def _client(i: int, rid: str, prompt: int, tokens: int, first_ms: int, done_ms: int, error: str | None = None):
    return ClientResult(i, rid, 0, first_ms * MS, done_ms * MS, prompt, tokens, error)


def _row(rid: str, prefill_j: float, decode_j: float, released_ms: int, first_ms: int, done_ms: int, tokens: int):
    return RequestRow(rid, "c", "OK", prefill_j, decode_j, True, 0, released_ms * MS, first_ms * MS, done_ms * MS,
                      tokens)  # fmt: skip


def test_a_fixed_run_reads_per_phase_joules_over_the_right_tokens_and_times() -> None:
    clients = [
        _client(0, "a", 500, 11, 100, 1100),
        _client(1, "b", 300, 11, 150, 1150),
        _client(2, "c", 400, 0, 0, 0, error="UNAVAILABLE: backend down"),  # failed: not counted
    ]
    rows = (
        _row("a", 10.0, 50.0, released_ms=0, first_ms=100, done_ms=1100, tokens=11),
        _row("b", 6.0, 50.0, released_ms=50, first_ms=150, done_ms=1150, tokens=11),
    )
    window = WindowEnergy(0, 2000 * MS, 300.0, 116.0, 184.0, 0, 0, rows)
    run = fixed_run("bf16", "together-2", 2, "together", clients, window)
    assert (run.requests, run.errors, run.missing) == (2, 1, 0)
    assert not run.ok  # a run with a failed request is reported, never used for a ratio
    assert fixed_run("bf16", "together-2", 2, "together", clients[:2], window).ok
    assert run.prefill_j_per_token == pytest.approx(16.0 / 800)
    assert run.decode_j_per_token == pytest.approx(100.0 / 20)  # 22 tokens, 2 of them from the prefills
    assert run.prefill_s == pytest.approx(0.15) and run.decode_s == pytest.approx(1.05)  # overlaps counted once
    assert run.prefill_w == pytest.approx(16.0 / 0.15) and run.decode_w == pytest.approx(100.0 / 1.05)
    assert run.attributed_j_per_request == pytest.approx(58.0)
    assert run.decode_ms_per_token == pytest.approx(100.0)
    assert run.counter_j == 300.0 and run.window_s == 2.0
    short = WindowEnergy(0, 2000 * MS, 300.0, 116.0, 184.0, 0, 0, rows[:1])
    assert fixed_run("bf16", "x", 2, "together", clients, short).missing == 1
    assert not fixed_run("bf16", "x", 2, "together", clients, short).ok


def _fixed(dtype: str, batch: int, prefill_j: float, decode_j: float, requests: int = 1, ok: bool = True) -> FixedRun:
    return FixedRun(dtype, "x", batch, "together", requests, 0, 0 if ok else 1, 100 * requests, 11 * requests,
                    prefill_j, decode_j, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0, True, 0, 0)  # fmt: skip


def _shaping_row(policy: str, bound_ms: float | None, counter_j: float, requests: int, window_s: float) -> RunRow:
    nan = math.nan
    return RunRow("poisson", "study", 1.0, policy, bound_ms, requests, 0, 100, window_s, counter_j, nan, nan,
                  counter_j / requests, nan, nan, 100.0, 100.0 if bound_ms is None else bound_ms / 2, nan, nan, nan,
                  nan, True, 0, 0)  # fmt: skip


def test_ratios_are_the_claimed_quantities_and_nan_where_a_run_is_missing() -> None:
    runs = [
        _fixed("bf16", 1, prefill_j=10.0, decode_j=100.0),
        _fixed("bf16", 32, prefill_j=160.0, decode_j=320.0, requests=32),
        _fixed("fp32", 1, prefill_j=40.0, decode_j=180.0),
        _fixed("fp32", 32, prefill_j=1600.0, decode_j=600.0, requests=32),
        _fixed("fp16", 32, prefill_j=1.0, decode_j=1.0, requests=32, ok=False),  # incomplete: never used
    ]
    shaping = [
        _shaping_row("passthrough", None, counter_j=3000.0, requests=10, window_s=20.0),
        _shaping_row("batch-long", 8000.0, counter_j=2600.0, requests=10, window_s=20.0),
    ]
    x = ratios(runs, shaping, idle_w=100.0, load="study")
    assert x.prefill_fp32_over_bf16 == pytest.approx(10.0)  # batch 32: 1600/3200 vs 160/3200 J per token
    assert x.decode_fp32_over_bf16 == pytest.approx(1.8)  # batch 1
    assert x.decode_b1_over_b32 == pytest.approx((100.0 / 10) / (320.0 / 320))
    assert x.shaping_above_floor == pytest.approx((2600 - 2000) / (3000 - 2000))  # the floor is 100 W x 20 s
    assert x.extra["shaping_bill_ratio"] == pytest.approx(2600 / 3000)
    assert x.sequential_over_shaped == pytest.approx(110.0 / 15.0)
    assert x.extra["fp32_sequential_over_bf16_shaped_j_per_request"] == pytest.approx(220.0 / 15.0)
    assert math.isnan(x.extra["prefill_j_per_token_fp16_over_bf16_b32"])
    line = result_line(x)
    assert line.split()[0] == "RESULT" and [kv.split("=")[0] for kv in line.split()[1:]] == [
        "prefill_j_per_token_fp32_over_bf16",
        "decode_j_per_token_fp32_over_bf16",
        "decode_j_per_token_b1_over_b32",
        "shaping_above_floor_ratio",
        "sequential_over_shaped_j_per_request",
    ]
    empty = ratios([], [], None, "study")
    assert all(math.isnan(v) for v in (empty.prefill_fp32_over_bf16, empty.shaping_above_floor))
    assert "nan" in result_line(empty)


def test_shaping_lane_puts_passthrough_next_to_every_shaped_run() -> None:
    policies = policies_for(QUICK)
    assert {p.name for p in policies} >= {"passthrough", "adaptive", "together-4", "together-32"}
    together = next(p for p in policies if p.name == "together-32")
    assert together.params == {"policy": "batch", "max_batch": 32, "hold_ms": 10_000.0}
    scenario = Scenario(make_trace("poisson", "study", 1.0, 5.0, 1), "m", "gpu0")
    named = {p.name: p for p in policies}
    named["batch-long"] = PolicySpec("batch-long", {"policy": "batch", "max_batch": 32, "hold_ms": 7500}, 8000.0)
    lane = shaping_lane(scenario, list(named.values()), ("adaptive", "batch-long"))
    assert [p.name for _, p in lane] == ["adaptive", "passthrough", "batch-long"]
    assert [p.name for _, p in shaping_lane(scenario, policies, ("adaptive",))] == ["adaptive", "passthrough"]
    assert shaping_lane(scenario, policies, ()) == []
