"""Is joulegate's bill fair? Each tenant's bill against the Shapley value of its traffic, on the simulator.

    python -m bench.shapley --quick     # 2 seeds x 12 scenes per power model: well under two minutes
    python -m bench.shapley             # 6 seeds x 30 scenes (writes bench/results/shapley_sim.md)

The checks that compare joulegate with the simulator's ``/sim/truth`` are circular for fairness: that truth uses the
attribution's own rule (prefill by prompt tokens, decode equally). The Shapley value is a principled ground truth:
each request's marginal energy averaged over every order in which the traffic could have joined, computed exactly by
replaying the trace on a virtual clock (``sim.replay``) for every coalition of the requests that share the GPU
(``sim.shapley``: players are requests, summed per tenant; why not tenants, and how it stays exact, is explained
there).

Setup. Four tenants of distinct shapes (``bench.shapley_trace``: long prompts / few tokens, short prompts / long
generations, bursts, tiny requests) in scenes of up to 9 requests, the GPU idle between scenes. Two power models
(``sim.costmodel.COST_MODELS``): ``default``, the simulator's (what the attribution assumes), and ``misspecified``
(decode time and power grow with the batch's KV-cache tokens, prefill power with the step's tokens, 110 W idle), so
the check is not circular. What joulegate bills: the full trace's replay (timelines as the gateway records them, the
counter as a 10 Hz sampler reads it: 100 ms updates, 50 ms lag, up to 3 ms of jitter) goes through the real metering
engine (``meter.engine``, SQLite, 10 s epochs) with the settings ``joulegate serve`` derives from its default
``[meter]`` section: calibrated lag and prefill power (per step, and per 1,000 step tokens where the counter shows
one), idle floor measured (``idle_power_w = "auto"``).

Per tenant it prints the above-idle game (Shapley vs the bill less its floor share, ``bench.shapley_report``), the
busy game (Shapley vs the bill) and the tenant game (tenants as players), pooled over seeds, for both power models,
and ends with

    RESULT shapley_max_tenant_err_pct=<default model, worst tenant, above idle> shapley_mean_tenant_err_pct=<mean>
           misspecified_max_tenant_err_pct=<misspecified model, worst tenant> busy_max_tenant_err_pct=<...>
           tenant_game_max_err_pct=<...>
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
import structlog

from bench.shapley_report import (
    TenantRow,
    floor_share_mj,
    markdown_table,
    max_abs,
    pooled,
    result_line,
    tenant_rows,
    text_table,
)
from bench.shapley_trace import SHAPES, make_trace
from meter.config import MeterConfig, engine_settings
from meter.engine import EngineSettings, MeteredBackend, MeteringEngine
from meter.ledger import timeline_row
from meter.store import make_engine, upgrade
from meter.store.bulk import BulkWriter
from sim.config import SimConfig
from sim.costmodel import with_cost_model
from sim.replay import Replay, Sampler, TraceRequest, replay
from sim.shapley import shapley_truth, sum_by_tenant, tenant_values

NS_PER_MS = 1_000_000
NS_PER_S = 1_000_000_000
T0_NS = 1_700_000_000 * NS_PER_S  # a whole number of epochs
COUNTER_LAG_MS = 50
SAMPLER = Sampler(period_ns=100 * NS_PER_MS, phase_ns=37 * NS_PER_MS, jitter_ns=3 * NS_PER_MS)
BACKEND, DEVICE = "sim0", "gpu0"
COUNTER_BASE_MJ = 10**9  # NVML counts from driver load, not from zero
RESULTS = Path(__file__).parent / "results" / "shapley_sim.md"


@dataclass(frozen=True, slots=True)
class Bill:
    """What the metering engine billed each request (mJ), and the model it used."""

    request_mj: dict[str, int]
    policy_lag_ns: int
    idle_w: float
    calibration: str


def joulegate_bill(rep: Replay, settings: EngineSettings, workdir: Path) -> Bill:
    """Run the metering engine over a replay's timelines and counter readings in a fresh SQLite database."""
    url = f"sqlite:///{workdir / f'bill-{time.monotonic_ns()}.db'}"
    upgrade(url)
    db = make_engine(url)
    try:
        samples = [(DEVICE, r.t_ns, COUNTER_BASE_MJ + r.energy_mj, None) for r in rep.readings]
        with db.begin() as conn:
            BulkWriter.for_dialect(db.dialect).write(
                conn, [], [timeline_row(t) for t in rep.timelines], samples, rep.end_ns + NS_PER_S
            )
        engine = MeteringEngine(db, [MeteredBackend(BACKEND, (DEVICE,))], settings)
        for _ in range(10):  # a settled calibration recomputes earlier epochs on the next pass
            report = engine.run_once(now_ns=rep.end_ns + 600 * NS_PER_S)
            if not report.attributed and not report.recomputed:
                break
        with db.connect() as conn:
            q = "SELECT request_id, SUM(prefill_mj), SUM(decode_mj) FROM request_energy GROUP BY request_id"
            billed = {rid: int(p) + int(d) for rid, p, d in conn.execute(sa.text(q))}
    finally:
        db.dispose()
    stats = engine.stats
    idle_w = stats.idle_power_w[BACKEND]
    if idle_w is None:
        raise RuntimeError("the engine measured no idle floor: the trace needs idle time between scenes")
    model = stats.calibration[BACKEND]
    lag_ns = model.lag_ns if model is not None else settings.lag_ns
    calibration = "not settled"
    if model is not None:
        calibration = (
            f"lag {model.lag_ns / NS_PER_MS:.0f} ms, prefill {model.prefill_ratio_at_no_tokens * model.active_w:.0f} W "
            f"+ {model.prefill_w_per_1k_tokens:.0f} W per 1k step tokens, active {model.active_w:.0f} W"
        )
    return Bill(billed, lag_ns, idle_w, calibration)


def run_one(
    trace: list[TraceRequest], config: SimConfig, settings: EngineSettings, workdir: Path
) -> tuple[list[TenantRow], str]:
    """One trace under one power model: Shapley truth, joulegate's bill, per-tenant rows and a one-line summary."""
    t = time.perf_counter()
    truth = shapley_truth(trace, config, start_ns=T0_NS)
    truth_s = time.perf_counter() - t
    dry = replay(trace, config, start_ns=T0_NS)
    epoch = settings.epoch_ns
    end = (dry.end_ns // epoch + 1) * epoch + NS_PER_S  # the last epoch whole, plus the lag
    rep = replay(trace, config, start_ns=T0_NS, end_ns=end, sampler=SAMPLER, backend=BACKEND)
    bill = joulegate_bill(rep, settings, workdir)
    policy = settings.policy(bill.idle_w, bill.policy_lag_ns)
    floor = floor_share_mj(rep.readings, rep.timelines, policy, bill.idle_w)
    tenant_of = {r.request_id: r.tenant for r in trace}
    above = {k: float(v) / 1e12 for k, v in sum_by_tenant(truth.above_idle_pj, tenant_of).items()}
    busy = {k: float(v) / 1e12 for k, v in sum_by_tenant(truth.busy_pj, tenant_of).items()}
    game = {k: float(v) / 1e12 for k, v in tenant_values(truth, tenant_of, 0).items()}
    rows = tenant_rows(tenant_of, SHAPES, above, busy, game, bill.request_mj, floor)
    note = (
        f"{len(trace)} requests, {len(truth.cluster_sizes)} clusters (largest {max(truth.cluster_sizes)}), "
        f"{truth.replays} replays in {truth_s:.1f} s; engine: idle {bill.idle_w:.1f} W, {bill.calibration}, "
        f"billed {sum(bill.request_mj.values()) * 1e9 / rep.busy_pj:.4f} of the busy energy; "
        f"worst tenant {max_abs(r.err_pct for r in rows):.2f} % (above idle), "
        f"{max_abs(r.busy_err_pct for r in rows):.2f} % (busy)"
    )
    return rows, note


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 seeds x 12 scenes (under two minutes)")
    ap.add_argument("--seeds", type=int, default=None, help="traces per power model (default 6; --quick 2)")
    ap.add_argument("--scenes", type=int, default=None, help="scenes per trace (default 30; --quick 12)")
    ap.add_argument("--seed", type=int, default=20261205, help="first seed")
    ap.add_argument("--write", type=Path, default=None, help=f"write the markdown report here (full run: {RESULTS})")
    args = ap.parse_args()
    seeds = args.seeds or (2 if args.quick else 6)
    scenes = args.scenes or (12 if args.quick else 30)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # the engine's info logs: off
    t0 = time.perf_counter()
    settings = engine_settings(MeterConfig())
    base = SimConfig(counter_lag_ms=COUNTER_LAG_MS)
    configs = {name: with_cost_model(base, name) for name in ("default", "misspecified")}
    pooled_rows: dict[str, list[TenantRow]] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="shapley-") as tmp:
        for k in range(seeds):
            seed = args.seed + k
            trace = make_trace(seed, scenes, list(configs.values()))
            for name, config in configs.items():
                rows, note = run_one(trace, config, settings, Path(tmp))
                pooled_rows.setdefault(name, []).extend(rows)
                line = f"[{time.perf_counter() - t0:5.1f} s] seed {seed} {name:12s} {note}"
                notes.append(line)
                print(line, flush=True)
    tables = {name: pooled(rows) for name, rows in pooled_rows.items()}
    wall_s = time.perf_counter() - t0
    head = (
        f"{seeds} traces x {scenes} scenes per power model (seeds {args.seed}..{args.seed + seeds - 1}); "
        f"engine settings of `joulegate serve`'s default [meter] (prefill_power_ratio {settings.prefill_power_ratio}, "
        f"calibrate {settings.calibrate}, idle auto); wall {wall_s:.0f} s on {platform.python_version()}"
    )
    print()
    print(head)
    for name, rows in tables.items():
        print(f"\n{name} power model (pooled over seeds; err: joulegate vs Shapley, + means over-charged)")
        print(text_table(rows))
    result = result_line(tables["default"], tables["misspecified"])
    out = args.write if args.write is not None else (None if args.quick else RESULTS)
    if out is not None:
        _write(out, head, tables, notes, result)
    print(result, flush=True)


def _write(path: Path, head: str, tables: dict[str, list[TenantRow]], notes: list[str], result: str) -> None:
    lines = [f"# Shapley check on the simulator ({dt.date.today().isoformat()})", "", head, ""]
    for name, rows in tables.items():
        lines += [f"## `{name}` power model", "", markdown_table(rows), ""]
    lines += ["## Runs", "", "```", *notes, "```", "", "```", result, "```", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
