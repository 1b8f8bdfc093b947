"""The Shapley check on a real GPU: each tenant's bill against the Shapley value of its traffic, measured.

    python3 -m bench.gpu.shapley_gpu --out $OUT                   # on a GPU machine (H100): reference backend, NVML
    python3 -m bench.gpu.shapley_gpu --out /tmp/sg --sim          # dry run on a CPU: the simulator and its counter

What ``bench/shapley.py`` does on the simulator's virtual clock, here in real time on the hardware: three tenants
(``long-prompt``: 900 prompt tokens, 4 new; ``long-gen``: 32 prompt, 64 new; ``tiny``: 16 prompt, 8 new), each with
its own API key, send one request per *scene* (``long-gen`` first, the others while it decodes); scenes are far
enough apart that the GPU idles between them. Every coalition of tenants — all 8, the empty one included, which
measures the idle floor — replays the trace (same offsets) in its own window of whole metering epochs that starts with
the GPU idle, and the whole set of 8 runs is repeated ``--repeats`` times, in a shuffled order each time (drift and
heat must not favour one coalition).

One process each: the backend (``bench.gpu.reference_backend`` on the GPU, or ``sim-tgi`` with ``--sim``);
``joulegate serve`` in front of it with the in-process meter (NVML, or the simulator's counter), SQLite, 1 s epochs
and the default ``[meter]`` settings otherwise (calibrated lag and ratio, idle floor measured); and this driver over
gRPC.

The bills compared are the ones a deployment publishes: final figures, cast under the meter's own settled fit. The
meter seals nothing until its fit of the backend settles (``uncalibrated_seal_hold_s``, 300 s, then the configured
guess seals), and redoes the recent epochs it attributed with the guess when it does. So before the runs the full
coalition's trace is replayed (``--calibrate-s`` at most) until the meter has stored a fit of the backend
(``backend_calibrations``), and after them the driver waits until every bill of the full coalition's runs is final
(``--final-s`` at most). The fit and how many bills were final are printed with the table; a bill still provisional
at the end is compared as it stands and counted.

Values. A coalition's energy above the idle floor is its window's counter energy (``GetBackendEnergy``) less the idle
floor (the empty coalition's windows: counter joules / seconds) times the window; its busy energy is the counter
energy less the floor over the window's idle time (no request between release and end, gateway timestamps). With one
request per tenant per scene and the scenes independent, the tenant game is the request game summed per tenant
(``sim/shapley.py``), so 8 coalitions give the exact request-level Shapley values, up to measurement noise: the
spread between repeats is reported. The noise floor: a window's counter energy is exact up to one counter update
at each edge (100 ms of idle power: ~12 J on an H100), which is why the trace has several scenes per window and the
runs are repeated. joulegate's side: the bills (``ListRequests``) of the full coalition's runs, less
the idle floor's share by the attribution's rules (``bench.shapley_report``). Writes ``shapley_gpu.md`` and
``shapley_gpu.json`` under ``--out``, prints the per-tenant table and

    RESULT shapley_max_tenant_err_pct=... shapley_mean_tenant_err_pct=... busy_max_tenant_err_pct=...
           repeat_spread_pct=<largest spread of a tenant's Shapley value between repeats, % of its mean>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import grpc

from bench._procs import _wait_grpc, create_admin_key, free_port
from bench.gpu.reference_tokenizer import WordTokenizer
from bench.gpu.shaping_gpu import _gpu_info, _process, _wait_http, _warm_up
from bench.shaping_config import GatewayBackend, gateway_config, toml_dumps
from bench.shaping_drive import _ns, _ts, epoch_ceil_ns, one_request, sleep_until_ns, wait_attributed
from bench.shaping_report import PolicySpec
from bench.shapley_report import TenantRow, floor_share_mj, markdown_table, max_abs, mean_abs, text_table
from meter.attribution import CounterReading
from meter.config import MeterConfig, engine_settings
from meter.pb.joulegate.v1 import energy_pb2 as epb
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from meter.timeline import Timeline
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.shapley import shapley

NS_PER_S = 1_000_000_000
NS_PER_MS = 1_000_000
EPOCH_S = 1.0
MODEL_ID = "llama-3-8b-random"
BACKEND = "gpu0"
# (tenant, prompt tokens, new tokens, offset in the scene in s): long-gen first, the others while it decodes
TENANTS = (("long-prompt", 900, 4, 0.4), ("long-gen", 32, 64, 0.0), ("tiny", 16, 8, 0.8))
SHAPES = {name: f"{prompt} prompt, {new} new, at +{offset:.1f} s" for name, prompt, new, offset in TENANTS}


@dataclass(frozen=True, slots=True)
class Arrival:
    tenant: str
    offset_s: float
    prompt_tokens: int
    new_tokens: int
    salt: int


@dataclass(frozen=True, slots=True)
class Run:
    """One coalition's replay of the trace, in its window of whole epochs."""

    repeat: int
    coalition: int  # bit i: TENANTS[i]
    start_ns: int
    end_ns: int
    errors: int


def make_trace(scenes: int, scene_s: float, seed: int) -> list[Arrival]:
    """One request per tenant per scene, ``scene_s`` apart; offsets jittered by up to 0.1 s (seeded)."""
    rng = random.Random(seed)
    out = []
    for k in range(scenes):
        for i, (tenant, prompt, new, offset) in enumerate(TENANTS):
            out.append(Arrival(tenant, k * scene_s + offset + rng.uniform(0, 0.1), prompt, new, 1000 * k + i))
    return sorted(out, key=lambda a: a.offset_s)


async def _send(stub: pbg.GenerationServiceStub, keys: dict[str, str], trace: list[Arrival], coalition: int,
                start_ns: int, tok: WordTokenizer) -> int:  # fmt: skip
    """Send the coalition's arrivals at ``start_ns + offset`` (open loop); the number of failed requests."""
    members = {TENANTS[i][0] for i in range(len(TENANTS)) if coalition >> i & 1}
    tasks = []
    for a in trace:
        if a.tenant not in members:
            continue
        await sleep_until_ns(start_ns + round(a.offset_s * NS_PER_S))
        md = (("authorization", f"Bearer {keys[a.tenant]}"),)
        text = tok.prompt(a.prompt_tokens, a.salt)
        tasks.append(asyncio.create_task(one_request(stub, 0, text, a.new_tokens, MODEL_ID, md, 300)))
    results = await asyncio.gather(*tasks)
    return sum(r.error is not None for r in results)


def stored_fit(db_path: Path, backend: str) -> dict[str, float] | None:
    """The fit the gateway's meter stored for ``backend`` (its own: the database is fresh); None while it has none."""
    cols = ("lag_ns", "prefill_w", "active_w", "idle_w", "prefill_w_per_1k_tokens", "prefill_mean_tokens", "intervals",
            "residual_w")  # fmt: skip
    try:
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
            row = conn.execute(
                f"SELECT {', '.join(cols)} FROM backend_calibrations WHERE backend = ?", (backend,)
            ).fetchone()
    except sqlite3.Error:
        return None  # not migrated yet, or busy: asked again
    return None if row is None else dict(zip(cols, row, strict=True))


async def _calibrate(stub: pbg.GenerationServiceStub, keys: dict[str, str], trace: list[Arrival], tok: WordTokenizer,
                     db_path: Path, seconds: float, t0: float) -> dict[str, float] | None:  # fmt: skip
    """Replay the full coalition's trace (fresh prompts each time) until the meter stores its fit (``seconds`` at
    most)."""
    deadline = time.monotonic() + seconds
    everyone = (1 << len(TENANTS)) - 1
    replay = 0
    while (fit := stored_fit(db_path, BACKEND)) is None and time.monotonic() < deadline:
        replay += 1
        salted = [replace(a, salt=a.salt + 100_000 * replay) for a in trace]
        errors = await _send(stub, keys, salted, everyone, time.time_ns() + 100 * NS_PER_MS, tok)
        print(f"[{time.monotonic() - t0:5.0f} s] calibration replay {replay}: {errors} errors", flush=True)
    return fit


async def _final_rows(reports: epbg.EnergyReportsStub, md: tuple[tuple[str, str], ...], runs: list[Run],
                      timeout_s: float) -> list[list[epb.RequestEnergy]]:  # fmt: skip
    """Every run's rows, once the full coalition's are all final (or ``timeout_s`` has passed: then as they stand)."""
    everyone = (1 << len(TENANTS)) - 1
    deadline = time.monotonic() + timeout_s
    while True:
        rows = [await _rows(reports, md, r.start_ns, r.end_ns) for r in runs]
        pending = sum(not x.final for r, rs in zip(runs, rows, strict=True) if r.coalition == everyone for x in rs)
        if not pending or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(2.0)


async def _rows(reports: epbg.EnergyReportsStub, md: tuple[tuple[str, str], ...], start_ns: int,
                end_ns: int) -> list[epb.RequestEnergy]:  # fmt: skip
    out: list[epb.RequestEnergy] = []
    token = ""
    while True:
        page = await reports.ListRequests(
            epb.ListRequestsRequest(model_id=MODEL_ID, start=_ts(start_ns), end=_ts(end_ns), page_size=1000,
                                    page_token=token),
            metadata=md,
        )  # fmt: skip
        out += page.requests
        token = page.next_page_token
        if not token:
            return out


async def _counter_j(reports: epbg.EnergyReportsStub, md: tuple[tuple[str, str], ...], start_ns: int,
                     end_ns: int) -> float:  # fmt: skip
    resp = await reports.GetBackendEnergy(epb.GetBackendEnergyRequest(start=_ts(start_ns), end=_ts(end_ns)),
                                          metadata=md)  # fmt: skip
    row = next((b for b in resp.backends if b.backend == BACKEND), None)
    if row is None:
        raise LookupError(f"no epochs of {BACKEND} in [{start_ns}, {end_ns})")
    if row.gaps:
        print(f"warning: {row.gaps} counter gaps in [{start_ns}, {end_ns}): that energy is unmeasured", flush=True)
    return row.counter_j


def _timeline(r: epb.RequestEnergy) -> Timeline | None:
    if not r.HasField("released") or not r.HasField("done"):
        return None
    return Timeline(
        request_id=r.request_id,
        tenant=r.tenant,
        model_id=r.model_id,
        backend=r.backend,
        received_ns=_ns(r.received),
        released_ns=_ns(r.released),
        first_token_ns=_ns(r.first_token) if r.HasField("first_token") else None,
        done_ns=_ns(r.done),
        prompt_tokens=r.prompt_tokens,
        generated_tokens=r.generated_tokens,
    )


def _busy_s(timelines: list[Timeline], start_ns: int, end_ns: int) -> float:
    """Time inside the window during which some request was on the GPU (released..done)."""
    spans = sorted((max(t.released_ns or 0, start_ns), min(t.done_ns, end_ns)) for t in timelines)
    busy = 0
    reach = start_ns
    for a, b in spans:
        a = max(a, reach)
        if b > a:
            busy += b - a
            reach = b
    return busy / NS_PER_S


async def _bench(args: argparse.Namespace, port: int, admin_key: str, keys: dict[str, str], trace: list[Arrival],
                 db_path: Path, t0: float) -> dict:  # fmt: skip
    tok = WordTokenizer(args.vocab)
    admin_md = (("authorization", f"Bearer {admin_key}"),)
    epoch_ns = round(EPOCH_S * NS_PER_S)
    window_ns = epoch_ceil_ns(round((trace[-1].offset_s + args.tail_s) * NS_PER_S), epoch_ns)
    rng = random.Random(args.seed)
    runs: list[Run] = []
    skipped = 0
    budget_end = t0 + args.budget_s - 40 - args.final_s  # reading the energy back and writing take ~30 s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.GenerationServiceStub(ch)
        reports = epbg.EnergyReportsStub(ch)
        await _warm_up(stub, MODEL_ID, admin_md, tok)
        fit = await _calibrate(stub, keys, trace, tok, db_path, args.calibrate_s, t0)
        print(f"[{time.monotonic() - t0:5.0f} s] meter's fit: {fit if fit else 'none yet (the configured guess)'}",
              flush=True)  # fmt: skip
        # an idle window first: the floor, with the model loaded and the engine waiting (pooled with the empty
        # coalition's windows)
        idle_start = epoch_ceil_ns(time.time_ns() + NS_PER_S, epoch_ns)
        idle_end = idle_start + epoch_ceil_ns(round(args.idle_s * NS_PER_S), epoch_ns)
        await sleep_until_ns(idle_end)
        runs.append(Run(-1, 0, idle_start, idle_end, 0))
        print(f"[{time.monotonic() - t0:5.0f} s] warmed up, idle window measured; {window_ns / NS_PER_S:.0f} s per run",
              flush=True)  # fmt: skip
        start = idle_end
        for repeat in range(args.repeats):
            order = list(range(1 << len(TENANTS)))
            rng.shuffle(order)
            for coalition in order:
                if time.monotonic() + window_ns / NS_PER_S > budget_end:
                    skipped += 1
                    continue
                await sleep_until_ns(start)
                errors = await _send(stub, keys, trace, coalition, start, tok)
                end = epoch_ceil_ns(max(start + window_ns, time.time_ns() + NS_PER_S // 2), epoch_ns)
                runs.append(Run(repeat, coalition, start, start + window_ns, errors))
                names = "+".join(TENANTS[i][0] for i in range(len(TENANTS)) if coalition >> i & 1) or "(idle)"
                late = "" if end == start + window_ns else f", ran {(end - start) / NS_PER_S:.0f} s: over the window"
                print(f"[{time.monotonic() - t0:5.0f} s] repeat {repeat} {names:25s} {errors} errors{late}",
                      flush=True)  # fmt: skip
                start = end
        await wait_attributed(reports, admin_md, {BACKEND: start}, timeout_s=120)
        counter = [await _counter_j(reports, admin_md, r.start_ns, r.end_ns) for r in runs]
        rows = await _final_rows(reports, admin_md, runs, args.final_s)
    everyone = (1 << len(TENANTS)) - 1
    full = [x for r, rs in zip(runs, rows, strict=True) if r.coalition == everyone for x in rs]
    return {"runs": runs, "counter_j": counter, "rows": rows, "window_ns": window_ns, "skipped": skipped,
            "fit_before_runs": fit, "fit_after_runs": stored_fit(db_path, BACKEND),
            "bills_final": sum(x.final for x in full), "bills": len(full)}  # fmt: skip


def analyse(runs: list[Run], counter_j: list[float], rows: list[list[epb.RequestEnergy]], window_ns: int,
            scenes: int) -> tuple[list[TenantRow], dict]:  # fmt: skip
    """Shapley values per repeat and pooled, joulegate's above-idle bill, per tenant."""
    n = len(TENANTS)
    window_s = window_ns / NS_PER_S
    idle = [(c, r.end_ns - r.start_ns) for r, c in zip(runs, counter_j, strict=True) if r.coalition == 0]
    if not idle:
        raise RuntimeError("no idle window: the idle floor is unknown")
    idle_w = sum(c for c, _ in idle) / (sum(d for _, d in idle) / NS_PER_S)
    above: dict[int, list[list[float]]] = {}  # repeat -> per-coalition values (J), empty coalition 0
    busy: dict[int, list[list[float]]] = {}
    for run, c, rs in zip(runs, counter_j, rows, strict=True):
        if run.repeat < 0:
            continue  # the idle window
        timelines = [t for t in map(_timeline, rs) if t is not None]
        above.setdefault(run.repeat, [[] for _ in range(1 << n)])[run.coalition].append(c - idle_w * window_s)
        idle_s = window_s - _busy_s(timelines, run.start_ns, run.end_ns)
        busy.setdefault(run.repeat, [[] for _ in range(1 << n)])[run.coalition].append(c - idle_w * idle_s)

    def mean_game(per_repeat: list[list[float]]) -> list[int]:  # mJ, v(empty) = 0
        return [0] + [round(1000 * sum(v) / len(v)) for v in per_repeat[1:]]

    complete = [k for k in above if all(above[k][m] for m in range(1, 1 << n))]
    if not complete:
        raise RuntimeError("no repeat ran every coalition: raise --budget-s or lower --scenes")
    per_repeat = {k: [float(x) / 1000 for x in shapley(mean_game(above[k]))] for k in complete}
    pooled_above = [sum(per_repeat[k][i] for k in complete) / len(complete) for i in range(n)]
    busy_per_repeat = [[float(x) / 1000 for x in shapley(mean_game(busy[k]))] for k in complete]
    busy_phi = [sum(v[i] for v in busy_per_repeat) / len(complete) for i in range(n)]
    # joulegate: the full coalition's runs, per tenant, less the floor's share
    settings = engine_settings(MeterConfig())
    policy = settings.policy(idle_w)
    bill: dict[str, float] = {}
    floor: dict[str, float] = {}
    full_runs = [(r, rs) for r, rs in zip(runs, rows, strict=True) if r.coalition == (1 << n) - 1]
    for run, rs in full_runs:
        timelines = [t for t in map(_timeline, rs) if t is not None]
        step = 100 * NS_PER_MS
        times = range(run.start_ns, run.end_ns + 3 * step, step)
        shares = floor_share_mj([CounterReading(t, 0) for t in times], timelines, policy, idle_w)
        for r in rs:
            bill[r.tenant] = bill.get(r.tenant, 0.0) + (r.prefill_j + r.decode_j) / len(full_runs)
            floor[r.tenant] = floor.get(r.tenant, 0.0) + shares.get(r.request_id, 0) / 1000 / len(full_runs)
    table = []
    for i, (tenant, *_rest) in enumerate(TENANTS):
        table.append(
            TenantRow(
                tenant=tenant,
                shape=SHAPES[tenant],
                requests=scenes,
                shapley_j=pooled_above[i],
                joulegate_j=bill.get(tenant, 0.0) - floor.get(tenant, 0.0),
                busy_shapley_j=busy_phi[i],
                bill_j=bill.get(tenant, 0.0),
                tenant_game_j=pooled_above[i],  # one request per tenant per scene: the same game
            )
        )
    spread = max(
        (max(per_repeat[k][i] for k in complete) - min(per_repeat[k][i] for k in complete)) / abs(pooled_above[i]) * 100
        for i in range(n)
    )
    info = {"idle_w": idle_w, "repeats_complete": len(complete), "repeat_spread_pct": spread,
            "per_repeat_shapley_j": {str(k): v for k, v in per_repeat.items()}}  # fmt: skip
    return table, info


def result_line(table: list[TenantRow], spread_pct: float) -> str:
    errs = [r.err_pct for r in table]
    return (
        f"RESULT shapley_max_tenant_err_pct={max_abs(errs):.2f} shapley_mean_tenant_err_pct={mean_abs(errs):.2f} "
        f"busy_max_tenant_err_pct={max_abs(r.busy_err_pct for r in table):.2f} repeat_spread_pct={spread_pct:.2f}"
    )


def _backend_cmd(args: argparse.Namespace, port: int) -> list[str]:
    py = args.backend_python or sys.executable
    if args.sim:
        return [py, "-m", "app.cli", "sim-tgi", "--port", str(port), "--counter-lag-ms", "100", "--name", "sim0"]
    return [py, "-m", "bench.gpu.reference_backend", "--port", str(port)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sim", action="store_true", help="the simulator and its counter instead of a GPU (dry run)")
    ap.add_argument("--backend-python", default=None, help="python for the backend (default: this one)")
    ap.add_argument("--scenes", type=int, default=3)
    ap.add_argument("--scene-s", type=float, default=None, help="scene spacing (default 7 s; --sim 1.5 s)")
    ap.add_argument("--tail-s", type=float, default=None, help="window past the last arrival (default 6 s; --sim 1)")
    ap.add_argument("--idle-s", type=float, default=None, help="idle window before the runs (default 10 s; --sim 4)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--calibrate-s",
        type=float,
        default=None,
        help="at most this long replaying the trace until the meter's fit settles (default 90 s; --sim 30)",
    )
    ap.add_argument("--final-s", type=float, default=60.0, help="at most this long waiting for final bills")
    ap.add_argument("--budget-s", type=float, default=560.0, help="the whole run, start-up included")
    ap.add_argument("--seed", type=int, default=20261205)
    args = ap.parse_args()
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    from common.logs import configure_logging

    configure_logging("warning", "console")
    scene_s = args.scene_s if args.scene_s is not None else (1.5 if args.sim else 7.0)
    args.tail_s = args.tail_s if args.tail_s is not None else (1.0 if args.sim else 6.0)
    args.idle_s = args.idle_s if args.idle_s is not None else (4.0 if args.sim else 10.0)
    args.calibrate_s = args.calibrate_s if args.calibrate_s is not None else (30.0 if args.sim else 90.0)
    args.vocab = 128_256
    trace = make_trace(args.scenes, scene_s, args.seed)
    gpu = {"gpu": "none (simulator)"} if args.sim else _gpu_info()
    print(f"GPU: {gpu}; {args.scenes} scenes x {len(TENANTS)} tenants, {args.repeats} repeats of 8 coalitions",
          flush=True)  # fmt: skip
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shapley_gpu_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    backend_port, gw_port = free_port(), free_port()
    db_url = f"sqlite:///{work / 'joulegate.db'}"
    with _process(_backend_cmd(args, backend_port), args.out / "server.log") as backend:
        _wait_http(f"http://127.0.0.1:{backend_port}/health", backend, 300)
        print(f"[{time.monotonic() - t0:5.0f} s] backend up ({'sim' if args.sim else 'reference'})", flush=True)
        admin_key = create_admin_key(db_url)
        from meter.store.db import make_engine
        from meter.store.keys import create_key

        engine = make_engine(db_url)
        keys = {name: create_key(engine, name).key for name, *_rest in TENANTS}
        engine.dispose()
        cfg = gateway_config(
            backends=[GatewayBackend(MODEL_ID, f"http://127.0.0.1:{backend_port}", BACKEND, () if args.sim else (0,))],
            policies=[PolicySpec("passthrough", {"policy": "passthrough"}, None, "no hold")],
            db_url=db_url,
            journal_path=str(work / "journal.jsonl"),
            grpc_listen=f"127.0.0.1:{gw_port}",
            meter_source="sim" if args.sim else "nvml",
            epoch_s=EPOCH_S,
        )
        (args.out / "gateway.toml").write_text(toml_dumps(cfg))
        gw_cmd = [sys.executable, "-m", "app.cli", "serve", "--config", str(args.out / "gateway.toml")]
        with _process(gw_cmd, args.out / "gateway.log") as gw:
            _wait_grpc(gw_port, 60)
            if gw.poll() is not None:
                raise RuntimeError("gateway exited")
            print(f"[{time.monotonic() - t0:5.0f} s] gateway up", flush=True)
            got = asyncio.run(_bench(args, gw_port, admin_key, keys, trace, work / "joulegate.db", t0))
            table, info = analyse(got["runs"], got["counter_j"], got["rows"], got["window_ns"], args.scenes)
            _write(args, table, info, got, gpu, time.monotonic() - t0)


def _fit_text(fit: dict[str, float] | None) -> str:
    if fit is None:
        return "none (the configured guess)"
    idle = "unknown" if fit["idle_w"] is None else f"{fit['idle_w']:.0f} W"
    return (
        f"lag {fit['lag_ns'] / NS_PER_MS:.0f} ms, prefill {fit['prefill_w']:.0f} W "
        f"(+{fit['prefill_w_per_1k_tokens']:.0f} W per 1k tokens, mean step {fit['prefill_mean_tokens']:.0f} tokens), "
        f"active {fit['active_w']:.0f} W, idle {idle}, {fit['intervals']:.0f} intervals, residual "
        f"{fit['residual_w']:.1f} W"
    )


def _write(args: argparse.Namespace, table: list[TenantRow], info: dict, got: dict, gpu: dict[str, str],
           wall_s: float) -> None:  # fmt: skip
    result = result_line(table, info["repeat_spread_pct"])
    head = [
        f"GPU: {gpu}; wall {wall_s:.0f} s; idle floor {info['idle_w']:.1f} W (idle window, empty coalitions)",
        f"{args.scenes} scenes x {len(TENANTS)} tenants ({'; '.join(f'{k}: {v}' for k, v in SHAPES.items())}); "
        f"{info['repeats_complete']} complete repeats of 8 coalitions, windows of {got['window_ns'] / NS_PER_S:.0f} s; "
        f"runs skipped (budget): {got['skipped']}; failed requests: {sum(r.errors for r in got['runs'])}",
        f"Shapley value per tenant and repeat (J, above idle): {info['per_repeat_shapley_j']}",
        f"meter's fit before the runs: {_fit_text(got['fit_before_runs'])}; after: {_fit_text(got['fit_after_runs'])}",
        f"bills of the full coalition final: {got['bills_final']} of {got['bills']}",
    ]
    print()
    print("\n".join(head))
    print(text_table(table))
    md = ["# Shapley check on a GPU", "", *(f"- {h}" for h in head), "", markdown_table(table), "", "```", result,
          "```", ""]  # fmt: skip
    (args.out / "shapley_gpu.md").write_text("\n".join(md))
    doc = {
        "gpu": gpu,
        "info": info,
        "table": [asdict(r) for r in table],
        "runs": [asdict(r) for r in got["runs"]],  # repeat -1: the idle window
        "counter_j": got["counter_j"],
        "window_ns": got["window_ns"],
        "fit_before_runs": got["fit_before_runs"],
        "fit_after_runs": got["fit_after_runs"],
        "bills_final": got["bills_final"],
        "bills": got["bills"],
    }
    (args.out / "shapley_gpu.json").write_text(json.dumps(doc, indent=1, default=str))
    print(result, flush=True)


if __name__ == "__main__":
    main()
