"""bench/shapley.py's pipeline on a small trace: Shapley truth, the real metering engine's bill, the floor share,
per-tenant rows and the RESULT line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench.shapley import joulegate_bill, run_one
from bench.shapley_report import TenantRow, floor_share_mj, pooled, result_line, text_table
from bench.shapley_trace import SHAPES, TENANTS, make_trace
from meter.attribution import AttributionPolicy, CounterReading
from meter.config import MeterConfig, engine_settings
from meter.timeline import Timeline
from sim.config import SimConfig
from sim.costmodel import with_cost_model
from sim.replay import Sampler, replay

S = 1_000_000_000
MS = 1_000_000
T0 = 1_700_000_000 * S


@pytest.fixture(scope="module")
def configs() -> list[SimConfig]:
    return [with_cost_model(SimConfig(counter_lag_ms=50), m) for m in ("default", "misspecified")]


def test_traces_have_four_tenant_shapes_in_separate_scenes(configs: list[SimConfig]) -> None:
    trace = make_trace(7, 4, configs)
    assert {r.tenant for r in trace} == set(TENANTS) == set(SHAPES)
    assert make_trace(7, 4, configs) == trace  # deterministic given the seed
    assert make_trace(8, 4, configs) != trace
    bursts = [r for r in trace if r.tenant == "burst"]
    assert len({r.arrival_ns for r in bursts}) == 4  # three at one instant, per scene
    for config in configs:  # every scene starts after the previous one is done
        rep = replay(trace, config, start_ns=0)
        done = {t.request_id: t.done_ns for t in rep.timelines}
        for k in range(1, 4):
            start = min(r.arrival_ns for r in trace if r.request_id.startswith(f"s{k:03d}"))
            assert all(done[r.request_id] < start for r in trace if r.request_id.startswith(f"s{k - 1:03d}"))


def test_the_engine_bills_what_the_counter_measured(configs: list[SimConfig], tmp_path: Path) -> None:
    config = configs[0]
    trace = make_trace(3, 4, configs)
    settings = engine_settings(MeterConfig())
    end = T0 + 40 * S
    rep = replay(trace, config, start_ns=T0, end_ns=end, sampler=Sampler(jitter_ns=3 * MS), backend="sim0")
    assert rep.last_activity_ns < end - 12 * S  # the epochs that hold the trace are whole
    bill = joulegate_bill(rep, settings, tmp_path)
    assert set(bill.request_mj) == {r.request_id for r in trace}
    billed = sum(bill.request_mj.values())
    assert billed == pytest.approx(rep.busy_pj / 10**9, rel=0.005)  # the idle bucket holds the idle time
    assert bill.idle_w == pytest.approx(config.idle_power_w, rel=0.01)
    # the floor share is the floor over the time requests were on the GPU, split among them
    policy = settings.policy(bill.idle_w, bill.policy_lag_ns)
    floor = floor_share_mj(rep.readings, rep.timelines, policy, bill.idle_w)
    busy_ns = (rep.end_ns - rep.start_ns) - rep.idle_pj // rep.idle_power_mw  # time a step ran
    assert sum(floor.values()) == pytest.approx(bill.idle_w * busy_ns / 10**6, rel=0.01)


def test_floor_share_gives_idle_time_nothing() -> None:
    rs = [CounterReading(T0 + k * 100 * MS, k) for k in range(30)]
    tl = Timeline("r", "t", "m", "b", T0 + 1 * S, T0 + 1 * S, T0 + 1100 * MS, T0 + 2 * S, 100, 10)
    share = floor_share_mj(rs, [tl], AttributionPolicy(lag_ns=0), 80.0)
    assert share == {"r": 80_000}  # 80 W for 1 s, whatever the counter says


def test_run_one_rows_and_the_result_line(configs: list[SimConfig], tmp_path: Path) -> None:
    trace = make_trace(5, 3, configs)
    settings = engine_settings(MeterConfig())
    rows = {}
    for name, config in zip(("default", "misspecified"), configs, strict=True):
        rows[name], note = run_one(trace, config, settings, tmp_path)
        assert "clusters" in note and "billed" in note
        assert [r.tenant for r in rows[name]] == list(TENANTS)
        assert sum(r.requests for r in rows[name]) == len(trace)
        for r in rows[name]:
            assert r.shapley_j > 0 and r.busy_shapley_j > r.shapley_j  # busy holds the floor too
            assert r.bill_j > r.joulegate_j > 0
    line = result_line(pooled(rows["default"] * 2), rows["misspecified"])
    m = re.fullmatch(
        r"RESULT shapley_max_tenant_err_pct=([\d.]+) shapley_mean_tenant_err_pct=([\d.]+) "
        r"misspecified_max_tenant_err_pct=([\d.]+) busy_max_tenant_err_pct=([\d.]+) tenant_game_max_err_pct=([\d.]+)",
        line,
    )
    assert m is not None, line
    assert float(m[1]) == pytest.approx(max(abs(r.err_pct) for r in rows["default"]), abs=0.006)
    assert float(m[2]) <= float(m[1])
    assert "long-prompt" in text_table(rows["default"])


def test_tenant_row_errors_have_the_sign_of_an_overcharge() -> None:
    r = TenantRow("t", "", 1, shapley_j=100, joulegate_j=110, busy_shapley_j=200, bill_j=190, tenant_game_j=50)
    assert (r.err_pct, r.busy_err_pct, r.tenant_game_err_pct) == (10.0, -5.0, 120.0)
