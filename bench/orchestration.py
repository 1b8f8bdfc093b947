"""Where requests go: spread vs pack placement on several simulated backends, live and on a virtual clock.

    python -m bench.orchestration --quick   # 20 s live trace per policy + a 120 s virtual-clock sweep (< 2 minutes)
    python -m bench.orchestration           # 90 s live traces

Live. For each policy, ``--backends`` (2) fresh simulated TGI servers (``sim/`` defaults, time_scale 1, counter lag
100 ms) behind one ``joulegate serve`` with ``[routing] policy`` set and the in-process meter (SQLite, 1 s epochs);
the same open-loop Poisson trace at low load (``--rate``, default 1 req/s: ~1.7 requests in flight across the fleet
on average) over gRPC. Energy is the meter's: every backend's counter over the same window of whole epochs (from
the trace's start to ``--tail-s`` after its last arrival), summed over the fleet. *Above floor* = that less the
fleet's idle floor over the window (80 W x window x backends): the work's own energy, what placement can change.
TTFT at the client.

Virtual clock. The same trace, and Poisson and bursty (on/off) loads from 0.25 to 8 req/s on 2 and 4 backends,
through ``sim.fleet``: the same batching core and power model, the gateway's own placement function, no network and
no CPU noise; it also prices parking (the idle floor of the backends pack left unused all window).

Ends with ``RESULT pack_above_floor_j_per_req_ratio=... ttft_p95_ratio=... parked_bill_ratio=...`` for the live low
load run (parked_bill_ratio from the virtual clock: pack's bill with the unused backends scaled in over spread's).
Writes ``bench/results/orchestration{_quick}.{md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import math
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench._procs import create_admin_key, gateway_process, sim_process
from bench.gpu.reference_tokenizer import WordTokenizer
from bench.shaping_config import toml_dumps
from bench.shaping_drive import (
    epoch_ceil_ns,
    percentile,
    read_window,
    run_trace,
    sleep_until_ns,
    wait_attributed,
)
from bench.shaping_trace import TRACE_KINDS, Lengths, Trace, make_trace
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim import costmodel
from sim.config import SimConfig
from sim.fleet import FleetRequest, FleetResult, serve

RESULTS = Path(__file__).parent / "results"
EPOCH_S = 1.0
NS_PER_S = 1_000_000_000
MODEL = "m"
SWEEP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True, slots=True)
class Outcome:
    """One policy on one trace."""

    policy: str
    backends: int
    rate_per_s: float
    requests: int
    errors: int
    bill_j: float  # the fleet's energy over the window
    above_floor_j: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    used_backends: int
    parked_bill_j: float | None = None  # virtual clock only
    kind: str = "poisson"  # the trace's arrivals: poisson or bursty (on/off)

    @property
    def above_floor_j_per_req(self) -> float:
        return self.above_floor_j / max(1, self.requests)

    @property
    def bill_j_per_req(self) -> float:
        return self.bill_j / max(1, self.requests)


# -- virtual clock ----------------------------------------------------------------------------------------------------


def fleet_trace(trace: Trace) -> list[FleetRequest]:
    return [
        FleetRequest(f"r{i}", round(a.offset_s * NS_PER_S), a.prompt_tokens, a.new_tokens)
        for i, a in enumerate(trace.arrivals)
    ]


POLICIES = ("spread", "pack", "pack-spill")  # pack-spill: pack with [routing] pack_spill_on_prefill


def _routing(policy: str) -> tuple[str, bool]:
    return ("pack", True) if policy == "pack-spill" else (policy, False)


def virtual(trace: Trace, policy: str, backends: int, pack_target: int, window_s: float) -> Outcome:
    placement, spill = _routing(policy)
    res: FleetResult = serve(
        fleet_trace(trace),
        SimConfig(),
        backends=backends,
        policy=placement,  # type: ignore[arg-type]
        pack_target=pack_target,
        spill_on_prefill=spill,
        end_ns=round(window_s * NS_PER_S),
    )
    ttft = [s.ttft_ns / 1e6 for s in res.served]
    return Outcome(
        policy=policy,
        backends=backends,
        rate_per_s=trace.rate_per_s,
        requests=len(res.served),
        errors=0,
        bill_j=res.energy_pj / 1e12,
        above_floor_j=res.above_floor_pj / 1e12,
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p95_ms=percentile(ttft, 0.95),
        used_backends=len({s.backend for s in res.served}),
        parked_bill_j=res.bill_pj(park=True) / 1e12,
        kind=trace.kind,
    )


# -- live -------------------------------------------------------------------------------------------------------------


def _config(urls: Sequence[str], policy: str, pack_target: int, db_url: str, journal: str) -> dict[str, Any]:
    return {
        "server": {"grpc_listen": "127.0.0.1:0", "http_listen": "", "drain_grace_s": 5.0, "log_level": "warning"},
        "db": {"url": db_url},
        "auth": {"required": True},
        "routing": {
            "policy": _routing(policy)[0],
            "pack_target": pack_target,
            "pack_spill_on_prefill": _routing(policy)[1],
        },
        "meter": {
            "source": "sim",
            "journal_path": journal,
            "epoch_s": EPOCH_S,
            "settle_s": 0.5,
            "engine_interval_s": 0.5,
            "idle_policy": "none",
        },
        "models": [
            {"model_id": MODEL, "backends": [{"url": u, "name": f"b{k}"} for k, u in enumerate(urls)]},
        ],
    }


async def _drive(port: int, key: str, trace: Trace, window_s: float, backends: int) -> tuple[list[Any], dict[str, Any]]:
    tok = WordTokenizer(128_256)
    md = (("authorization", f"Bearer {key}"),)
    epoch_ns = round(EPOCH_S * NS_PER_S)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.GenerationServiceStub(ch)
        reports = epbg.EnergyReportsStub(ch)
        start_ns = epoch_ceil_ns(time.time_ns() + NS_PER_S // 2, epoch_ns)
        await sleep_until_ns(start_ns)
        clients = await run_trace(
            stub, trace, model_id=MODEL, traffic_class="default", start_ns=start_ns, prompt_of=tok.prompt, metadata=md
        )
        end_ns = start_ns + epoch_ceil_ns(round(window_s * NS_PER_S), epoch_ns)
        last = max(c.done_ns for c in clients)
        if last > end_ns:
            raise RuntimeError(f"the trace ran {(last - end_ns) / 1e9:.1f} s past its window: raise --tail-s")
        names = [f"b{k}" for k in range(backends)]
        await wait_attributed(reports, md, dict.fromkeys(names, end_ns), timeout_s=120)
        windows = [
            await read_window(reports, md, backend=n, model_id=MODEL, start_ns=start_ns, end_ns=end_ns) for n in names
        ]
    return clients, {"windows": windows, "window_ns": end_ns - start_ns}


def live(trace: Trace, policy: str, backends: int, pack_target: int, window_s: float) -> Outcome:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        urls = [
            stack.enter_context(sim_process("--name", f"{policy}-{k}", "--model-id", MODEL, "--counter-lag-ms", "100"))
            for k in range(backends)
        ]
        db_url = f"sqlite:///{workdir / 'bench.db'}"
        key = create_admin_key(db_url)
        cfg = _config(urls, policy, pack_target, db_url, str(workdir / "journal.jsonl"))
        (workdir / "gateway.toml").write_text(toml_dumps(cfg))
        port, _proc = stack.enter_context(
            gateway_process(workdir, [], args=("--config", str(workdir / "gateway.toml")))
        )
        clients, got = asyncio.run(_drive(port, key, trace, window_s, backends))
    windows = got["windows"]
    counter_j = sum(w.counter_j for w in windows)
    floor_j = costmodel.idle_power_mw(SimConfig()) * got["window_ns"] * backends / 1e12
    ttft = [c.ttft_ms for c in clients if c.ttft_ms is not None]
    used = sum(1 for w in windows if w.attributed_j > 0)
    return Outcome(
        policy=policy,
        backends=backends,
        rate_per_s=trace.rate_per_s,
        requests=len(clients),
        errors=sum(c.error is not None for c in clients),
        bill_j=counter_j,
        above_floor_j=counter_j - floor_j,
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p95_ms=percentile(ttft, 0.95),
        used_backends=used,
    )


# -- report -----------------------------------------------------------------------------------------------------------


def table(rows: Sequence[Outcome]) -> str:
    out = [
        f"{'trace':<8} {'policy':<10} {'GPUs':>4} {'req/s':>6} {'requests':>8} {'bill J/req':>10} "
        f"{'above-floor J/req':>17} {'parked J/req':>12} {'TTFT p50':>8} {'TTFT p95':>8} {'used':>4}"
    ]
    for r in rows:
        parked = "-" if r.parked_bill_j is None else f"{r.parked_bill_j / max(1, r.requests):.1f}"
        out.append(
            f"{r.kind:<8} {r.policy:<10} {r.backends:>4} {r.rate_per_s:>6.2f} {r.requests:>8} "
            f"{r.bill_j_per_req:>10.1f} {r.above_floor_j_per_req:>17.1f} {parked:>12} {r.ttft_p50_ms:>8.1f} "
            f"{r.ttft_p95_ms:>8.1f} {r.used_backends:>4}"
        )
    return "\n".join(out)


def ratios(spread: Outcome, pack: Outcome) -> tuple[float, float, float]:
    """(above-floor J/req, TTFT p95, bill J/req) of pack over spread."""
    return (
        pack.above_floor_j_per_req / spread.above_floor_j_per_req,
        pack.ttft_p95_ms / spread.ttft_p95_ms,
        pack.bill_j_per_req / spread.bill_j_per_req,
    )


def plot(sweep: Sequence[Outcome], live_rows: Sequence[Outcome], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    styles = {
        ("spread", 2): "C0-o",
        ("pack", 2): "C1-o",
        ("pack-spill", 2): "C2-o",
        ("spread", 4): "C0--s",
        ("pack", 4): "C1--s",
        ("pack-spill", 4): "C2--s",
    }
    for (policy, n), style in styles.items():
        rows = sorted(
            (r for r in sweep if r.policy == policy and r.backends == n and r.kind == "poisson"),
            key=lambda r: r.rate_per_s,
        )
        if not rows:
            continue
        xs = [r.rate_per_s for r in rows]
        ax1.plot(xs, [r.above_floor_j_per_req for r in rows], style, label=f"{policy}, {n} GPUs (virtual)")
        ax2.plot(xs, [r.ttft_p95_ms for r in rows], style, label=f"{policy}, {n} GPUs (virtual)")
    for r in live_rows:
        color = {"spread": "C0", "pack": "C1"}.get(r.policy, "C2")
        ax1.plot([r.rate_per_s], [r.above_floor_j_per_req], "*", ms=16, color=color, label=f"{r.policy} live")
        ax2.plot([r.rate_per_s], [r.ttft_p95_ms], "*", ms=16, color=color, label=f"{r.policy} live")
    for ax, label in ((ax1, "above-floor J per request"), (ax2, "TTFT p95, ms")):
        ax.set_xscale("log")
        ax.set_xticks(list(SWEEP_RATES), [f"{r:g}" for r in SWEEP_RATES])
        ax.minorticks_off()
        ax.set_xlabel("arrival rate, req/s (Poisson)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 s live traces (default 90 s)")
    ap.add_argument("--duration-s", type=float, default=None)
    ap.add_argument("--rate", type=float, default=1.0, help="the live run's arrival rate, req/s (low load)")
    ap.add_argument("--backends", type=int, default=2)
    ap.add_argument("--pack-target", type=int, default=7)
    ap.add_argument("--tail-s", type=float, default=6.0, help="window kept after the last arrival")
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--no-live", action="store_true", help="the virtual clock only")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    from common.logs import configure_logging

    configure_logging("warning", "console")
    t0 = time.monotonic()
    duration_s = args.duration_s or (20.0 if args.quick else 90.0)
    lengths = Lengths()
    window_s = duration_s + args.tail_s
    sweep_duration = 120.0 if args.quick else max(duration_s, 300.0)
    sweep: list[Outcome] = []
    for kind in TRACE_KINDS:
        for n in (2, 4):
            for rate in SWEEP_RATES:
                tr = make_trace(kind, "sweep", rate, sweep_duration, args.seed, lengths)
                for policy in POLICIES:
                    sweep.append(virtual(tr, policy, n, args.pack_target, sweep_duration + args.tail_s))
    print("virtual clock (sim.fleet), Poisson and bursty (on 2 s / off 6 s), prompts 200-800, 64-256 new tokens, "
          f"{sweep_duration:.0f} s traces, pack target {args.pack_target}:")  # fmt: skip
    print(table(sweep))

    trace = make_trace("poisson", "low", args.rate, duration_s, args.seed, lengths)
    predicted = [virtual(trace, p, args.backends, args.pack_target, window_s) for p in POLICIES]
    print(f"\nthe live trace on the virtual clock ({len(trace.arrivals)} requests, {args.rate:g} req/s, "
          f"{args.backends} backends):")  # fmt: skip
    print(table(predicted))
    live_rows: list[Outcome] = []
    if not args.no_live:
        for policy in POLICIES:
            print(f"live: {policy} on {args.backends} simulated backends ...", flush=True)
            live_rows.append(live(trace, policy, args.backends, args.pack_target, window_s))
        print("\nlive, through joulegate serve and its meter:")
        print(table(live_rows))
    wall_s = time.monotonic() - t0

    measured = live_rows or predicted
    a_ratio, t_ratio, bill_ratio = ratios(measured[0], measured[1])
    pv = predicted
    parked_ratio = (pv[1].parked_bill_j or math.nan) / pv[0].bill_j
    source = "live" if live_rows else "virtual"
    s_ratio, s_ttft, _ = ratios(measured[0], measured[2])
    result = (
        f"RESULT pack_above_floor_j_per_req_ratio={a_ratio:.3f} ttft_p95_ratio={t_ratio:.3f} "
        f"bill_ratio={bill_ratio:.3f} parked_bill_ratio={parked_ratio:.3f} "
        f"spill_above_floor_j_per_req_ratio={s_ratio:.3f} spill_ttft_p95_ratio={s_ttft:.3f} "
        f"backends={args.backends} rate_per_s={args.rate:g} source={source}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "orchestration_quick" if args.quick else "orchestration"
    title = f"spread vs pack (target {args.pack_target}) on simulated H100s; stars: live at {args.rate:g} req/s"
    plot(sweep, live_rows, args.out / f"{stem}.png", title)
    md = [
        f"# Placement: spread vs pack{' (quick)' if args.quick else ''}",
        "",
        f"`python -m bench.orchestration{' --quick' if args.quick else ''}` — {dt.date.today().isoformat()}, "
        f"{platform.machine()} {platform.system()}, wall {wall_s:.0f} s. Plot: `{stem}.png`.",
        "",
        f"Live: {len(trace.arrivals)} requests, Poisson at {args.rate:g} req/s over {duration_s:.0f} s, "
        f"{args.backends} simulated backends per policy, window {window_s:.0f} s.",
        "",
        "```",
        table(live_rows) if live_rows else "(no live run)",
        "```",
        "",
        "The same trace on the virtual clock:",
        "",
        "```",
        table(predicted),
        "```",
        "",
        f"Sweep on the virtual clock ({sweep_duration:.0f} s traces, Poisson and bursty on/off):",
        "",
        "```",
        table(sweep),
        "```",
        "",
        "```",
        result,
        "```",
        "",
    ]
    (args.out / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {args.out / stem}.md/.png in {wall_s:.0f} s")
    print(result)


if __name__ == "__main__":
    main()
