"""bench/gpu/shapley_gpu.py: its analysis on a game with a known answer, and the whole run against the simulator
(``--sim``: the real gateway, meter and engine, in real time) as the coordinator will run it on an H100."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu.shapley_gpu import TENANTS, Run, analyse, make_trace
from bench.shaping_drive import _ts
from meter.pb.joulegate.v1 import energy_pb2 as epb

S = 1_000_000_000
MS = 1_000_000
REPO = Path(__file__).resolve().parents[1]


def _row(rid: str, tenant: str, start_ns: int, prefill_j: float, decode_j: float) -> epb.RequestEnergy:
    return epb.RequestEnergy(
        request_id=rid,
        tenant=tenant,
        model_id="m",
        backend="gpu0",
        prompt_tokens=100,
        generated_tokens=10,
        received=_ts(start_ns),
        released=_ts(start_ns),
        first_token=_ts(start_ns + 100 * MS),
        done=_ts(start_ns + 1 * S),
        prefill_j=prefill_j,
        decode_j=decode_j,
    )


def test_an_additive_game_gives_each_tenant_its_own_cost() -> None:
    """Tenants that never share the GPU: each coalition's energy above the floor is the sum of its tenants' costs,
    so each tenant's Shapley value is its own cost, and a bill that charges exactly that is 0 % off."""
    idle_w, window_s = 100.0, 10
    cost = {"long-prompt": 50.0, "long-gen": 300.0, "tiny": 5.0}
    runs, counter, rows = [], [], []
    start = 0
    for repeat in range(2):
        for coalition in range(8):
            members = [TENANTS[i][0] for i in range(3) if coalition >> i & 1]
            runs.append(Run(repeat, coalition, start, start + window_s * S, 0))
            counter.append(idle_w * window_s + sum(cost[t] for t in members) + (repeat - 0.5))  # +-0.5 J noise
            # each tenant on the GPU for 1 s on its own: the floor there is part of its bill
            rows.append(
                [
                    _row(f"{repeat}-{coalition}-{t}", t, start + i * 2 * S, cost[t] + idle_w, 0.0)
                    for i, t in enumerate(members)
                ]
            )
            start += window_s * S
    table, info = analyse(runs, counter, rows, window_s * S, scenes=1)
    assert info["idle_w"] == pytest.approx(idle_w)  # the empty coalition's windows, noise averaged out
    for r in table:
        assert r.shapley_j == pytest.approx(cost[r.tenant], abs=0.01)
        assert r.bill_j == pytest.approx(cost[r.tenant] + idle_w)
        assert r.joulegate_j == pytest.approx(cost[r.tenant], abs=0.2)  # bill less 1 s of floor (100 ms readings)
        assert r.busy_shapley_j == pytest.approx(cost[r.tenant] + idle_w, abs=0.2)
    # the +-0.5 J of each repeat is one constant over the non-empty coalitions: a third to each tenant, which moves the
    # smallest (tiny, 5 J) the most between repeats: 1/3 J
    assert info["repeat_spread_pct"] == pytest.approx(100 * (1 / 3) / 5, rel=1e-3)


def test_the_trace_has_one_request_per_tenant_per_scene() -> None:
    trace = make_trace(3, 9.0, seed=1)
    assert len(trace) == 9 and [a.offset_s for a in trace] == sorted(a.offset_s for a in trace)
    for k in range(3):
        scene = [a for a in trace if k * 9.0 <= a.offset_s < (k + 1) * 9.0]
        assert sorted(a.tenant for a in scene) == sorted(t for t, *_ in TENANTS)
    assert make_trace(3, 9.0, seed=1) == trace


@pytest.mark.slow
def test_runs_end_to_end_against_the_simulator(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.gpu.shapley_gpu", "--out", str(tmp_path), "--sim", "--scenes", "2",
           "--repeats", "1", "--budget-s", "240"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stdout.strip().splitlines()[-1]
    m = re.fullmatch(
        r"RESULT shapley_max_tenant_err_pct=([\d.]+) shapley_mean_tenant_err_pct=([\d.]+) "
        r"busy_max_tenant_err_pct=([\d.]+) repeat_spread_pct=([\d.]+)",
        last,
    )
    assert m is not None, last
    doc = json.loads((tmp_path / "shapley_gpu.json").read_text())
    runs = doc["runs"]
    assert [r["repeat"] for r in runs] == [-1] + [0] * 8  # the idle window, then every coalition once
    assert sorted(r["coalition"] for r in runs[1:]) == list(range(8)) and all(r["errors"] == 0 for r in runs)
    assert doc["info"]["idle_w"] == pytest.approx(80.0, rel=0.02)  # the simulator's floor, measured
    table = {r["tenant"]: r for r in doc["table"]}
    assert set(table) == {t for t, *_ in TENANTS}
    assert all(r["shapley_j"] > 0 and r["bill_j"] > r["joulegate_j"] > 0 for r in table.values())
    # Real time on a shared CPU, and each window's counter energy is exact only up to one 100 ms counter step at each
    # edge (8 J of idle): the large tenant must agree, the small ones are within the noise of one repeat.
    lg = table["long-gen"]
    assert lg["joulegate_j"] == pytest.approx(lg["shapley_j"], rel=0.1)
    assert (tmp_path / "shapley_gpu.md").read_text().count("|") > 20
