"""What arrival shaping saves, measured on the simulator through the real gateway and the real meter.

    python -m bench.shaping --quick        # 12 s traces, five policies: under two minutes
    python -m bench.shaping                 # 90 s traces, plus a bulk class with a long hold (~12 minutes)

Setup. One simulated TGI server (``sim/``, ``time_scale`` 1: real step timing, real-time energy; counter lag 100 ms
like NVML) per scenario, all behind one ``joulegate serve`` process with the in-process meter on the simulated
counters (SQLite, 1 s epochs). A scenario is one trace — Poisson or bursty (on/off) arrivals at low, medium or high
load — on its own backend; its policies run one after the other on that backend, each in its own window of whole
epochs that starts with the backend idle, so energies never mix. Scenarios run side by side on their own backends.
Every policy serves the same trace (same seed: same arrival times, prompts and lengths). Requests go over gRPC
(``GenerateStream``) with ``x-traffic-class`` naming the policy's class.

Loads are fractions of the simulated backend's capacity (``sim_capacity_req_s``: the request rate one simulated H100
sustains at 128 in flight with the trace's mean lengths, prefill included).

Metrics (see ``bench/shaping_report.py``): counter J/request over the window (idle included: the honest bill),
attributed J/request (what the gateway charged the requests), J/token, client TTFT and end-to-end p50/p95, and the
attributed energy against the simulator's ground truth. Writes ``bench/results/shaping_sim{_quick}.{md,csv,png}``,
prints the table, and ends with

    RESULT j_per_request_ratio=<best shaped / passthrough at low load> ttft_p95_over_bound=<its TTFT p95 / bound>

for the Poisson trace at low load, where "best shaped" is the lowest counter J/request among shaped policies whose
client TTFT p95 is within their own bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import platform
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from bench._procs import create_admin_key, gateway_process, sim_process
from bench.gpu.reference_tokenizer import WordTokenizer
from bench.shaping_config import GatewayBackend, gateway_config, toml_dumps
from bench.shaping_report import (
    Best,
    PolicySpec,
    RunRow,
    best_shaped,
    csv_text,
    markdown_table,
    plot,
    result_line,
    standard_policies,
    summarize,
    text_table,
)
from bench.shaping_runs import RunRecord, Scenario, assign_windows, measure, run_lane
from bench.shaping_trace import TRACE_KINDS, Burstiness, Lengths, Trace, make_trace
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.config import SimConfig

RATES_PER_S = {"low": 0.5, "medium": 2.0, "high": 8.0}
EPOCH_S = 1.0
BOUND_MS = 2000.0  # the common TTFT bound of window/batch/tokens/adaptive
SERVICE_MS = 300.0  # the backend's own TTFT allowed for a released batch (two 4096-token prefills ~ 0.4 s)
LONG_BOUND_MS = 8000.0  # the bulk class of the full run
RESULTS = Path(__file__).parent / "results"


def sim_capacity_req_s(cfg: SimConfig, lengths: Lengths) -> float:
    """Requests/s one simulated backend sustains at ``max_concurrent_requests`` in flight: per request one prefill of
    the mean prompt, and the mean generation at the full batch's per-token step cost."""
    batch = cfg.max_concurrent_requests
    prefill_s = lengths.mean_prompt_tokens / cfg.prefill_tokens_per_s
    step_s = (cfg.decode_step_ms + batch * cfg.decode_per_request_ms) / 1000
    return 1 / (prefill_s + lengths.mean_new_tokens * step_s / batch)


def _truth_j(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/sim/truth", timeout=30) as r:
        doc = json.load(r)
    return {rid: (t["prefill_mj"] + t["decode_mj"]) / 1000 for rid, t in doc["requests"].items()}


async def _warm_up(stub: pbg.GenerationServiceStub, scenarios: list[Scenario], md: tuple[tuple[str, str], ...],
                   prompt: str) -> None:  # fmt: skip
    """One short request per backend, so connections and first-call costs are out of the way before any window."""

    async def one(s: Scenario) -> None:
        req = pb.SingleGenerationRequest(
            model_id=s.model_id,
            request=pb.GenerationRequest(text=prompt),
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4)),
        )
        async for _ in stub.GenerateStream(req, metadata=md, timeout=30):
            pass

    await asyncio.gather(*(one(s) for s in scenarios))


async def _bench(port: int, admin_key: str, scenarios: list[Scenario], policies: list[PolicySpec],
                 urls: dict[str, str], tail_s: float) -> list[RunRow]:  # fmt: skip
    tok = WordTokenizer(128_256)
    md = (("authorization", f"Bearer {admin_key}"),)
    epoch_ns = round(EPOCH_S * 1e9)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.GenerationServiceStub(ch)
        reports = epbg.EnergyReportsStub(ch)
        await _warm_up(stub, scenarios, md, tok.prompt(64, 1))

        def progress(rec: RunRecord) -> None:
            errs = sum(c.error is not None for c in rec.clients)
            print(f"  {rec.scenario.trace.name:15s} {rec.policy.name:12s} {len(rec.clients):4d} requests, "
                  f"{errs} errors, {(rec.last_done_ns - rec.start_ns) / 1e9:5.1f} s", flush=True)  # fmt: skip

        lanes = await asyncio.gather(
            *(
                run_lane(
                    stub,
                    [(s, p) for p in policies],
                    epoch_ns=epoch_ns,
                    tail_s=tail_s,
                    prompt_of=tok.prompt,
                    metadata=md,
                    on_done=progress,
                )
                for s in scenarios
            )
        )
        records = [r for lane in lanes for r in lane]
        assign_windows(records, epoch_ns)
        print("waiting for the meter to attribute the last window ...", flush=True)
        windows = await measure(reports, md, records)
    truth = {s.backend: await asyncio.to_thread(_truth_j, urls[s.backend]) for s in scenarios}
    by_policy = {p.name: i for i, p in enumerate(policies)}
    kinds = {k: i for i, k in enumerate(TRACE_KINDS)}
    loads = {k: i for i, k in enumerate(RATES_PER_S)}
    rows = [
        summarize(
            trace=r.scenario.trace.kind,
            load=r.scenario.trace.load,
            rate_per_s=r.scenario.trace.rate_per_s,
            policy=r.policy,
            clients=r.clients,
            window=w,
            truth_j=truth[r.scenario.backend],
            notes=r.notes,
        )
        for r, w in zip(records, windows, strict=True)
    ]
    return sorted(rows, key=lambda x: (kinds[x.trace], loads[x.load], by_policy[x.policy]))


def _describe(traces: list[Trace], policies: list[PolicySpec], lengths: Lengths, capacity: float,
              burst: Burstiness, duration_s: float, seed: int) -> str:  # fmt: skip
    lines = [
        f"- Backend: one simulated H100 + TGI per scenario (`sim/` defaults, time_scale 1, counter lag 100 ms): idle "
        f"80 W, prefill 650 W, decode 250 W + 4 W x batch; capacity ~{capacity:.1f} req/s at 128 in flight.",
        f"- Traces: {duration_s:.0f} s of open-loop arrivals, seed {seed}; {lengths.describe()}; `poisson` and "
        f"`bursty` (on/off: ON {burst.on_s:.0f} s / OFF {burst.off_s:.0f} s mean, exponential; ON rate "
        f"{burst.peak_factor:.0f}x the mean, same mean rate).",
        "- Loads: "
        + ", ".join(f"{k} {v:g} req/s ({v / capacity:.0%} of capacity)" for k, v in RATES_PER_S.items())
        + ". Requests per trace: "
        + ", ".join(f"{t.name} {len(t.arrivals)}" for t in traces)
        + ".",
        "- Policies (one traffic class each; TTFT bound = hold + the backend's own TTFT for a released batch): "
        + "; ".join(f"`{p.name}` ({p.note}{f', bound {p.bound_ms:.0f} ms' if p.bound_ms else ''})" for p in policies)
        + ".",
        f"- Gateway: `joulegate serve`, in-process meter on the simulated counters, SQLite, {EPOCH_S:g} s epochs, "
        "idle policy none. Each run is metered over whole epochs from its start, the same length for every policy "
        "of a scenario (the longest any needs).",
    ]
    return "\n".join(lines)


def _best_lines(rows: list[RunRow]) -> list[str]:
    out = []
    for kind in TRACE_KINDS:
        for load in RATES_PER_S:
            for label, cap in (("any bound", None), (f"bound <= {BOUND_MS:.0f} ms", BOUND_MS)):
                b: Best | None = best_shaped(rows, kind, load, cap)
                if b is None:
                    out.append(f"- {kind} {load}, {label}: no shaped policy within its bound")
                    continue
                out.append(
                    f"- {kind} {load}, {label}: `{b.row.policy}` {b.row.j_per_request:.1f} vs "
                    f"{b.baseline.j_per_request:.1f} J/request = x{b.j_ratio:.2f} (attributed x{b.attr_ratio:.2f}), "
                    f"TTFT p95 {b.row.ttft_p95_ms:.0f} ms = {b.ttft_over_bound:.2f} of its "
                    f"{b.row.bound_ms:.0f} ms bound"
                )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="12 s traces, five policies (under two minutes)")
    ap.add_argument("--duration-s", type=float, default=None, help="trace length (default 12 quick, 90 full)")
    ap.add_argument("--seed", type=int, default=20261126)
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the table, CSV and plot go")
    ap.add_argument("--tail-s", type=float, default=None, help="slot kept after the last arrival + longest hold")
    args = ap.parse_args()
    from common.logs import configure_logging

    configure_logging("warning", "console")
    duration_s = args.duration_s or (12.0 if args.quick else 90.0)
    lengths, burst, simcfg = Lengths(), Burstiness(), SimConfig()
    capacity = sim_capacity_req_s(simcfg, lengths)
    policies = standard_policies(
        BOUND_MS, SERVICE_MS, simcfg.max_batch_prefill_tokens, long_bound_ms=None if args.quick else LONG_BOUND_MS
    )
    traces = [
        make_trace(kind, load, rate, duration_s, args.seed, lengths, burst)
        for kind in TRACE_KINDS
        for load, rate in RATES_PER_S.items()
    ]
    t0 = time.monotonic()
    print(_describe(traces, policies, lengths, capacity, burst, duration_s, args.seed), flush=True)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        urls = {
            t.name: stack.enter_context(
                sim_process("--name", t.name, "--model-id", t.name, "--counter-lag-ms", "100", "--time-scale", "1")
            )
            for t in traces
        }
        db_url = f"sqlite:///{workdir / 'bench.db'}"  # the path gateway_process passes with --db
        admin_key = create_admin_key(db_url)
        scenarios = [Scenario(t, t.name, t.name) for t in traces]
        cfg = gateway_config(
            backends=[GatewayBackend(s.model_id, urls[s.backend], s.backend) for s in scenarios],
            policies=policies,
            db_url=db_url,
            journal_path=str(workdir / "journal.jsonl"),
            grpc_listen="127.0.0.1:0",
            meter_source="sim",
            epoch_s=EPOCH_S,
        )
        (workdir / "gateway.toml").write_text(toml_dumps(cfg))
        cfg_arg = ("--config", str(workdir / "gateway.toml"))
        port, _proc = stack.enter_context(gateway_process(workdir, [], args=cfg_arg))
        tail_s = args.tail_s if args.tail_s is not None else (4.0 if args.quick else 6.0)
        rows = asyncio.run(_bench(port, admin_key, scenarios, policies, urls, tail_s))
    wall_s = time.monotonic() - t0
    _write(args, rows, traces, policies, lengths, capacity, burst, duration_s, wall_s)


def _write(args: argparse.Namespace, rows: list[RunRow], traces: list[Trace], policies: list[PolicySpec],
           lengths: Lengths, capacity: float, burst: Burstiness, duration_s: float, wall_s: float) -> None:  # fmt: skip
    print()
    print(text_table(rows))
    for r in rows:
        for note in r.notes:
            print(f"note: {r.trace} {r.load} {r.policy}: {note}")
    errs = [r.truth_err_pct for r in rows if r.truth_err_pct is not None]
    worst = max(errs, key=abs) if errs else float("nan")
    cons = max(abs(r.conservation_error_mj) for r in rows)
    final = all(r.final for r in rows)
    check = (
        f"meter vs simulator truth (attributed J of each run's requests): worst {worst:+.2f} %, "
        f"mean |err| {sum(abs(e) for e in errs) / max(1, len(errs)):.2f} %; conservation error max {cons} mJ; "
        f"all requests final: {final}"
    )
    best_lines = _best_lines(rows)
    best = best_shaped(rows, "poisson", "low")
    result = result_line(best)
    print(check)
    print("\n".join(best_lines))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "shaping_sim_quick" if args.quick else "shaping_sim"
    title = (f"joulegate arrival shaping on the simulator ({duration_s:.0f} s traces): J/request vs TTFT p95; "
             "solid = counter (incl. idle), hollow = attributed")  # fmt: skip
    plot(rows, args.out / f"{stem}.png", title)
    (args.out / f"{stem}.csv").write_text(csv_text(rows))
    md = [
        f"# Arrival shaping on the simulator{' (quick)' if args.quick else ''}",
        "",
        f"`python -m bench.shaping{' --quick' if args.quick else ''}` — {dt.date.today().isoformat()}, "
        f"{platform.machine()} {platform.system()}, wall {wall_s:.0f} s. Plot: `{stem}.png`, data: `{stem}.csv`.",
        "",
        _describe(traces, policies, lengths, capacity, burst, duration_s, args.seed),
        "",
        "Columns: `J/req` = energy counter over the run's window / requests (idle included); `x pass` = that over "
        "passthrough's in the same scenario; `attr J/req` = energy the gateway attributed to the requests (no idle) "
        "/ requests; `J/token` = counter J / generated tokens; TTFT and e2e at the client; `gw TTFT` = received -> "
        "first token at the gateway; `truth err` = attributed vs the simulator's ground truth for the same requests.",
        "",
        markdown_table(rows),
        "",
        check,
        "",
        "Best shaped policy within its TTFT bound, per scenario:",
        "",
        *best_lines,
        "",
        "```",
        result,
        "```",
        "",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {args.out / stem}.md/.csv/.png in {wall_s:.0f} s")
    print(result)


if __name__ == "__main__":
    main()
