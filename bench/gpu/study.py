"""The seed study's three findings (Delavande, Pierrard, Luccioni, arXiv 2601.22362), reproduced through joulegate.

    python3 -m bench.gpu.study --out $OUT                                   # on an H100: the full study
    python3 -m bench.gpu.study --out $OUT --quick                           # a smoke run of every step
    python3 -m bench.gpu.study --out /tmp/st --backend sim --meter sim --quick   # dry run of the energy path
    python3 -m bench.gpu.study --out /tmp/st --tiny --device cpu --meter none --quick   # dry run of the engine

Per precision (``--dtypes``, default bf16, fp32, fp16, fp8): the reference backend (``reference_backend.py``, the
CUDA-graph engine, random-init Llama-3-8B-shaped model in that precision) and ``joulegate serve`` in front of it with
the in-process NVML meter (``gpus = [0]``, SQLite, 1 s epochs) are started; this driver sends requests over gRPC and
reads every figure back from ``joulegate.v1.EnergyReports``, as an operator would:

1. **Precision** (every dtype): prompts of ``--prompt-tokens`` (512), ``--new-tokens`` (128) each; batch 1 (4
   requests one after the other) and batch 32 (32 requests released together by a gateway ``batch`` class). Prefill
   J per prompt token and decode J per generated token, per phase, from the reports.
2. **Batching** (bf16): the same requests released together at batch 1, 2, 4, 8, 16, 32 and 64: decode J/token.
3. **Arrival shaping** (bf16): one Poisson trace (1 req/s for 30 s; prompts 200-800 tokens, 64-256 new) through
   passthrough and the shaped classes ``adaptive`` (TTFT bound 2 s) and ``batch-long`` (8 s), each in its own window
   of whole epochs of the same length (``bench.shaping_runs``): the bill (counter J over the window / requests) and
   the bill above the idle floor (idle power measured with the model loaded, x window).
4. **The study's own comparison** (labelled so): one request at a time (batch 1, sequential) against 32 released
   together, attributed J/request, in bf16; and fp32 one at a time against bf16 released together, the closest to
   the study's ~100x (which also bundles TGI against a baseline server, and idle between arrivals).

``--budget-s`` bounds the whole run: a precision whose phase would not fit is skipped, and what ran is written.
Writes ``study.md`` and ``study.json`` (and ``logs.txt``: the tail of every process's log) under ``--out``; prints
the tables and

    RESULT prefill_j_per_token_fp32_over_bf16=… decode_j_per_token_fp32_over_bf16=… decode_j_per_token_b1_over_b32=…
           shaping_above_floor_ratio=… sequential_over_shaped_j_per_request=…

(prefill at batch 32, decode at batch 1; ``study_report.py`` defines each), then ``RESULT_EXTRA`` with the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench._procs import _wait_grpc, create_admin_key, free_port
from bench.gpu.reference_tokenizer import WordTokenizer
from bench.gpu.shaping_gpu import _gpu_info, _process, _wait_http
from bench.gpu.study_report import (
    FixedRun,
    batching_table,
    extra_line,
    fixed_run,
    precision_table,
    ratios,
    result_line,
    shaping_table,
)
from bench.shaping_config import GatewayBackend, gateway_config, toml_dumps
from bench.shaping_drive import (
    ClientResult,
    Metadata,
    WindowEnergy,
    epoch_ceil_ns,
    one_request,
    read_window,
    sleep_until_ns,
    wait_attributed,
)
from bench.shaping_report import PolicySpec, RunRow, standard_policies, summarize
from bench.shaping_runs import Scenario, assign_windows, measure, run_lane
from bench.shaping_trace import Lengths, make_trace
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2_grpc as pbg

NS_PER_S = 1_000_000_000
EPOCH_S = 1.0
BOUND_MS = 2000.0
SERVICE_MS = 500.0
LONG_BOUND_MS = 8000.0
PREFILL_TOKENS = 8192
SEQUENTIAL_REQUESTS = 4
TOGETHER_HOLD_MS = 10_000.0  # a "together" class waits this long at most for its B requests (they arrive at once)
TRACE_LENGTHS = Lengths(prompt_min_tokens=200, prompt_max_tokens=800, new_min_tokens=64, new_max_tokens=256)
MAX_INPUT_TOKENS = 1024
MAX_TOTAL_TOKENS = 1280
BACKEND = "gpu0"


@dataclass(frozen=True, slots=True)
class Plan:
    """What one run of the study does (``--quick`` shrinks it to a smoke test)."""

    dtypes: tuple[str, ...]
    prompt_tokens: int
    new_tokens: int
    sequential_requests: int
    precision_batches: tuple[int, ...]
    batching_batches: tuple[int, ...]
    trace_rate_per_s: float
    trace_duration_s: float
    shaped: tuple[str, ...]
    idle_s: int

    @property
    def together_batches(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in (*self.precision_batches, *self.batching_batches) if b > 1}))


FULL = Plan(("bf16", "fp32", "fp16", "fp8"), 512, 128, SEQUENTIAL_REQUESTS, (1, 32), (1, 2, 4, 8, 16, 32, 64),
            1.0, 30.0, ("adaptive", "batch-long"), 3)  # fmt: skip
QUICK = Plan(("bf16", "fp32"), 256, 32, 2, (1, 32), (1, 4, 32), 2.0, 5.0, ("adaptive",), 1)


def policies_for(plan: Plan) -> list[PolicySpec]:
    """passthrough (the default class), the shaped classes under test, and one ``together-B`` class per batch size:
    a ``batch`` policy that releases B requests at once (they are sent together; the hold is only a backstop)."""
    wanted = {"passthrough", *plan.shaped}
    out = [
        p
        for p in standard_policies(BOUND_MS, SERVICE_MS, PREFILL_TOKENS, long_bound_ms=LONG_BOUND_MS)
        if p.name in wanted
    ]
    for b in plan.together_batches:
        params = {"policy": "batch", "max_batch": b, "hold_ms": TOGETHER_HOLD_MS}
        out.append(PolicySpec(f"together-{b}", params, TOGETHER_HOLD_MS + SERVICE_MS, f"{b} released together"))
    return out


def shaping_lane(
    scenario: Scenario, policies: list[PolicySpec], shaped: tuple[str, ...]
) -> list[tuple[Scenario, PolicySpec]]:
    """The shaped policies in order with passthrough after the first (``S0, passthrough, S1, ...``): every shaped run
    is next to a passthrough run, and one shaped policy costs two runs, not three."""
    by_name = {p.name: p for p in policies}
    order = [by_name[shaped[0]], by_name["passthrough"], *(by_name[n] for n in shaped[1:])] if shaped else []
    return [(scenario, p) for p in order]


@dataclass(slots=True)
class Phase:
    """One precision's results."""

    dtype: str
    idle_w: float | None = None
    prefill_tokens_per_s: float | None = None  # the engine's, measured before the gateway starts
    runs: list[FixedRun] = field(default_factory=list)
    shaping: list[RunRow] = field(default_factory=list)
    engine_stats: dict[str, Any] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Pending:
    label: str
    batch: int
    mode: str
    start_ns: int
    clients: list[ClientResult]
    end_ns: int = 0


async def _warm_up(stub: pbg.GenerationServiceStub, model_id: str, md: Metadata, tok: WordTokenizer) -> None:
    await one_request(stub, 0, tok.prompt(64, 90_000), 8, model_id, md, 300)
    await asyncio.gather(*(one_request(stub, i, tok.prompt(300, 90_000 + i), 8, model_id, md, 300) for i in range(8)))


async def _fixed_runs(stub: pbg.GenerationServiceStub, plan: Plan, batches: list[int], model_id: str, md: Metadata,
                      tok: WordTokenizer, epoch_ns: int, deadline_ns: int, phase: Phase) -> list[_Pending]:  # fmt: skip
    """Batch 1: ``sequential_requests`` one after the other; batch B: B at once through ``together-B``. Each run
    starts on an epoch boundary with the GPU idle and keeps its window until the epoch after its last answer."""
    out: list[_Pending] = []
    start = epoch_ceil_ns(time.time_ns() + NS_PER_S // 4, epoch_ns)
    for i, b in enumerate(batches):
        if start > deadline_ns:
            phase.notes.append(f"batch {b}: skipped (budget)")
            continue
        await sleep_until_ns(start)
        salt = 1000 * (i + 1)
        prompts = [tok.prompt(plan.prompt_tokens, salt + k) for k in range(max(b, 1))]
        if b == 1:
            pending = _Pending("sequential", 1, "sequential", start, [])
            for k in range(plan.sequential_requests):
                text = tok.prompt(plan.prompt_tokens, salt + k)
                pending.clients.append(await one_request(stub, k, text, plan.new_tokens, model_id, md, 600))
        else:
            mdc = (*md, ("x-traffic-class", f"together-{b}"))
            pending = _Pending(f"together-{b}", b, "together", start, [])
            pending.clients = list(
                await asyncio.gather(
                    *(one_request(stub, k, p, plan.new_tokens, model_id, mdc, 600) for k, p in enumerate(prompts))
                )
            )
        last = max(c.done_ns for c in pending.clients)
        pending.end_ns = epoch_ceil_ns(last + 300_000_000, epoch_ns)
        _print_run(phase.dtype, pending.label, pending.clients)
        out.append(pending)
        start = pending.end_ns
    return out


async def _phase(args: argparse.Namespace, plan: Plan, phase: Phase, gw_port: int, admin_key: str, model_id: str,
                 deadline_ns: int, backend_url: str) -> None:  # fmt: skip
    tok = WordTokenizer(args.vocab)
    md: Metadata = (("authorization", f"Bearer {admin_key}"),)
    epoch_ns = round(EPOCH_S * NS_PER_S)
    metered = args.meter != "none"
    main = phase.dtype == plan.dtypes[0]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw_port}") as ch:
        stub = pbg.GenerationServiceStub(ch)
        reports = epbg.EnergyReportsStub(ch)
        await _warm_up(stub, model_id, md, tok)
        idle_start = epoch_ceil_ns(time.time_ns() + NS_PER_S // 4, epoch_ns)
        idle_end = idle_start + plan.idle_s * epoch_ns
        await sleep_until_ns(idle_end)
        batches = sorted(set(plan.batching_batches if main else plan.precision_batches))
        fixed = await _fixed_runs(stub, plan, batches, model_id, md, tok, epoch_ns, deadline_ns, phase)
        records = []
        if main and plan.shaped:
            policies = policies_for(plan)
            trace = make_trace("poisson", "study", plan.trace_rate_per_s, plan.trace_duration_s, args.seed,
                               TRACE_LENGTHS)  # fmt: skip
            lane = shaping_lane(Scenario(trace, model_id, BACKEND), policies, plan.shaped)
            try:
                records = await run_lane(
                    stub,
                    lane,
                    epoch_ns=epoch_ns,
                    tail_s=4.0,
                    prompt_of=tok.prompt,
                    metadata=md,
                    on_done=lambda r: _print_run(phase.dtype, r.policy.name, r.clients),
                    deadline_ns=deadline_ns,
                    on_skip=lambda s, p: phase.notes.append(f"shaping {p.name}: skipped (budget)"),
                )
                assign_windows(records, epoch_ns)
            except Exception as exc:  # the fixed runs above are still measured
                phase.notes.append(f"shaping failed: {type(exc).__name__}: {exc}")
                records = []
        if not metered:
            nan_window = WindowEnergy(0, 0, math.nan, math.nan, math.nan, 0, 0, ())
            phase.runs = [fixed_run(phase.dtype, f.label, f.batch, f.mode, f.clients, nan_window) for f in fixed]
            windows = [nan_window for _ in records]
        else:
            until = max([idle_end, *(f.end_ns for f in fixed), *(r.window_end_ns for r in records)])
            await wait_attributed(reports, md, {BACKEND: until}, timeout_s=60)
            idle = await read_window(reports, md, backend=BACKEND, model_id="-", start_ns=idle_start, end_ns=idle_end)
            phase.idle_w = idle.counter_j / ((idle_end - idle_start) / NS_PER_S)
            for f in fixed:
                try:
                    w = await read_window(reports, md, backend=BACKEND, model_id=model_id, start_ns=f.start_ns,
                                          end_ns=f.end_ns)  # fmt: skip
                except (LookupError, grpc.RpcError) as exc:
                    phase.notes.append(f"{f.label}: no energy ({type(exc).__name__}: {exc})")
                    continue
                phase.runs.append(fixed_run(phase.dtype, f.label, f.batch, f.mode, f.clients, w))
            windows = await measure(reports, md, records, timeout_s=60) if records else []
        phase.shaping = [
            summarize(
                trace="poisson",
                load="study",
                rate_per_s=r.scenario.trace.rate_per_s,
                policy=r.policy,
                clients=r.clients,
                window=w,
                notes=r.notes,
            )
            for r, w in zip(records, windows, strict=True)
        ]
    if args.backend == "reference":
        try:
            phase.engine_stats = (await asyncio.to_thread(_get_json, f"{backend_url}/reference/stats"))["engine"]
        except OSError as exc:
            phase.notes.append(f"engine stats unreadable: {exc}")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _post_json(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def measure_prefill_tokens_per_s(backend_url: str, tok: WordTokenizer, prompt_tokens: int, batch: int = 16) -> float:
    """The engine's prefill speed, as an operator configures it for the meter (``meter.prefill_tokens_per_s``): one
    prompt alone, then ``batch`` together, straight to the backend (1 new token each), and the engine's own prefill
    time from ``/reference/stats``. The meter uses it to tell a prefill step from the wait before it; the default
    (20,000 tokens/s) would book most of a slow fp32 prefill as the decode of the requests already running."""
    from concurrent.futures import ThreadPoolExecutor

    def one(salt: int) -> None:
        _post_json(
            f"{backend_url}/generate", {"inputs": tok.prompt(prompt_tokens, salt), "parameters": {"max_new_tokens": 1}}
        )

    before = _get_json(f"{backend_url}/reference/stats")["engine"]
    one(70_000)
    with ThreadPoolExecutor(batch) as pool:
        list(pool.map(one, range(70_001, 70_001 + batch)))
    after = _get_json(f"{backend_url}/reference/stats")["engine"]
    return (after["prefill_tokens"] - before["prefill_tokens"]) / (after["prefill_s"] - before["prefill_s"])


def _print_run(dtype: str, label: str, clients: list[ClientResult]) -> None:
    errors = [c.error for c in clients if c.error]
    span_s = (max(c.done_ns for c in clients) - min(c.sent_ns for c in clients)) / 1e9 if clients else 0.0
    print(f"    {dtype} {label}: {len(clients)} requests, {len(errors)} errors, {span_s:.1f} s"
          + (f" ({errors[0]})" if errors else ""), flush=True)  # fmt: skip


def _backend_cmd(args: argparse.Namespace, dtype: str, port: int) -> list[str]:
    py = sys.executable
    if args.backend == "sim":
        return [py, "-m", "app.cli", "sim-tgi", "--port", str(port), "--counter-lag-ms", "100", "--name", "sim0",
                "--max-input-tokens", str(MAX_INPUT_TOKENS), "--max-total-tokens", str(MAX_TOTAL_TOKENS)]  # fmt: skip
    cmd = [py, "-m", "bench.gpu.reference_backend", "--port", str(port), "--dtype", dtype, "--max-batch-size", "64",
           "--max-input-tokens", str(MAX_INPUT_TOKENS), "--max-total-tokens", str(MAX_TOTAL_TOKENS)]  # fmt: skip
    if args.tiny:
        cmd += ["--tiny", "--device", args.device]
    return cmd


PHASE_ESTIMATE_S = {"bf16": 200.0, "fp32": 90.0, "fp16": 60.0, "fp8": 60.0}


def run_phase(args: argparse.Namespace, plan: Plan, dtype: str, t0: float, work: Path) -> Phase:
    phase = Phase(dtype)
    started = time.monotonic()
    deadline_ns = time.time_ns() + round((args.budget_s - (started - t0) - 30) * NS_PER_S)
    backend_port, gw_port = free_port(), free_port()
    db_url = f"sqlite:///{work / f'joulegate-{dtype}.db'}"
    model_id = f"llama-3-8b-random-{dtype}"
    backend_url = f"http://127.0.0.1:{backend_port}"
    with _process(_backend_cmd(args, dtype, backend_port), work / f"server-{dtype}.log") as backend:
        _wait_http(f"{backend_url}/health", backend, 300)
        print(f"[{time.monotonic() - t0:5.0f} s] {dtype}: backend up ({args.backend})", flush=True)
        admin_key = create_admin_key(db_url)
        meter: dict[str, Any] = {}
        if args.backend == "reference":
            tok = WordTokenizer(args.vocab)
            phase.prefill_tokens_per_s = measure_prefill_tokens_per_s(backend_url, tok, plan.prompt_tokens)
            meter["prefill_tokens_per_s"] = round(phase.prefill_tokens_per_s, 1)
            print(f"[{time.monotonic() - t0:5.0f} s] {dtype}: prefill {phase.prefill_tokens_per_s:.0f} tokens/s "
                  "(meter.prefill_tokens_per_s)", flush=True)  # fmt: skip
        cfg = gateway_config(
            backends=[GatewayBackend(model_id, backend_url, BACKEND, (0,) if args.meter == "nvml" else ())],
            policies=policies_for(plan),
            db_url=db_url,
            journal_path=str(work / f"journal-{dtype}.jsonl"),
            grpc_listen=f"127.0.0.1:{gw_port}",
            meter_source=args.meter,
            epoch_s=EPOCH_S,
            meter=meter,
        )
        (work / f"gateway-{dtype}.toml").write_text(toml_dumps(cfg))
        gw_cmd = [sys.executable, "-m", "app.cli", "serve", "--config", str(work / f"gateway-{dtype}.toml")]
        with _process(gw_cmd, work / f"gateway-{dtype}.log") as gw:
            _wait_grpc(gw_port, 60)
            if gw.poll() is not None:
                raise RuntimeError("gateway exited")
            asyncio.run(_phase(args, plan, phase, gw_port, admin_key, model_id, deadline_ns, backend_url))
    phase.wall_s = time.monotonic() - started
    return phase


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "grpc"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:
            out[name] = "-"
    try:
        import torch

        out["cuda"] = str(torch.version.cuda)
    except Exception:
        pass
    return out


def report(args: argparse.Namespace, plan: Plan, phases: list[Phase], meta: dict[str, Any]) -> str:
    runs = [r for p in phases for r in p.runs]
    main = next((p for p in phases if p.dtype == plan.dtypes[0]), None)
    shaping = main.shaping if main else []
    idle_w = main.idle_w if main else None
    x = ratios(runs, shaping, idle_w, "study")
    head = [
        f"- GPU: {meta['gpu']}; versions: {meta['versions']}; backend: {args.backend}; meter: {args.meter}",
        f"- fixed runs: prompts {plan.prompt_tokens} tokens, {plan.new_tokens} new; batch 1 = "
        f"{plan.sequential_requests} requests one after the other; batch B = B released together",
        "- idle floor (model loaded): "
        + ", ".join(f"{p.dtype} {p.idle_w:.1f} W" if p.idle_w is not None else f"{p.dtype} -" for p in phases),
        "- engine prefill speed (meter.prefill_tokens_per_s): "
        + ", ".join(f"{p.dtype} {p.prefill_tokens_per_s:.0f} tokens/s" for p in phases if p.prefill_tokens_per_s),
        f"- shaping trace: poisson {plan.trace_rate_per_s:g} req/s for {plan.trace_duration_s:.0f} s, "
        f"{TRACE_LENGTHS.describe()}",
        f"- wall: {meta['wall_s']:.0f} s; " + "; ".join(f"{p.dtype} {p.wall_s:.0f} s" for p in phases),
    ]
    notes = [f"- {p.dtype}: {n}" for p in phases for n in p.notes]
    notes += [f"- {p.dtype}: engine {json.dumps(p.engine_stats)}" for p in phases if p.engine_stats]
    md = [
        "# The study's findings through joulegate",
        "",
        *head,
        "",
        "## Precision (per phase, from EnergyReports)",
        "",
        precision_table(runs),
        "",
        f"## Batching ({plan.dtypes[0]})",
        "",
        batching_table(runs, plan.dtypes[0]),
        "",
        "## Arrival shaping (one open-loop trace)",
        "",
        shaping_table(shaping, idle_w),
        "",
        "## The study's own comparison (one at a time vs released together; attributed J/request)",
        "",
        _comparison(runs),
        "",
        "## Notes",
        "",
        *(notes or ["- none"]),
        "",
        "```",
        result_line(x),
        extra_line(x),
        "```",
        "",
    ]
    return "\n".join(md)


def _comparison(runs: list[FixedRun]) -> str:
    from bench.gpu.study_report import find

    lines = ["| what | attributed J/request | x shaped bf16 |", "|---|---|---|"]
    shaped = find(runs, "bf16", 32)
    for label, run in (
        ("bf16, one at a time", find(runs, "bf16", 1)),
        ("fp32, one at a time (the study's baseline precision)", find(runs, "fp32", 1)),
        ("bf16, 32 released together by a batch class", shaped),
    ):
        if run is None:
            continue
        base = shaped.attributed_j_per_request if shaped else math.nan
        lines.append(f"| {label} | {run.attributed_j_per_request:.1f} | {run.attributed_j_per_request / base:.2f} |")
    return "\n".join(lines)


def _log_tails(work: Path, lines: int = 60) -> str:
    out = []
    for path in sorted(work.glob("*.log")):
        text = path.read_text(errors="replace").splitlines()
        out.append(f"===== {path.name} ({len(text)} lines, last {lines})")
        out.extend(text[-lines:])
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", choices=("reference", "sim"), default="reference")
    ap.add_argument("--tiny", action="store_true", help="reference backend: the tiny model (dry run)")
    ap.add_argument("--device", default="cpu", help="with --tiny")
    ap.add_argument("--meter", choices=("nvml", "sim", "none"), default="nvml")
    ap.add_argument("--quick", action="store_true", help="a smoke run of every step (shorter, fewer precisions)")
    ap.add_argument("--dtypes", default=None, help="precisions, the first one the main (default bf16,fp32,fp16,fp8)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="the whole run, start-ups included")
    ap.add_argument("--seed", type=int, default=20261205)
    args = ap.parse_args()
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    args.vocab = 2048 if args.tiny else 128_256
    plan = QUICK if args.quick else FULL
    if args.dtypes:
        plan = dataclasses.replace(plan, dtypes=tuple(args.dtypes.split(",")))
    from common.logs import configure_logging

    configure_logging("warning", "console")
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"study_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"gpu": _gpu_info(), "versions": _versions(), "plan": asdict(plan)}
    print(f"GPU: {meta['gpu']}; {meta['versions']}", flush=True)
    phases: list[Phase] = []
    for dtype in plan.dtypes:
        left = args.budget_s - (time.monotonic() - t0)
        need = PHASE_ESTIMATE_S.get(dtype, 60.0) * (0.4 if args.quick else 1.0)
        if dtype != plan.dtypes[0] and left < need:
            print(f"{dtype}: skipped, {left:.0f} s left of the budget, ~{need:.0f} s needed", flush=True)
            phases.append(Phase(dtype, notes=[f"skipped: {left:.0f} s left, ~{need:.0f} s needed"]))
            continue
        try:
            phases.append(run_phase(args, plan, dtype, t0, work))
        except Exception as exc:  # one precision failing must not lose the others
            print(f"{dtype}: FAILED {type(exc).__name__}: {exc}", flush=True)
            phases.append(Phase(dtype, notes=[f"failed: {type(exc).__name__}: {exc}"]))
        meta["wall_s"] = time.monotonic() - t0
        text = report(args, plan, phases, meta)
        (args.out / "study.md").write_text(text)
        doc = {**meta, "phases": [asdict(p) for p in phases]}
        (args.out / "study.json").write_text(json.dumps(doc, indent=1, default=str))
        (args.out / "logs.txt").write_text(_log_tails(work))
    meta["wall_s"] = time.monotonic() - t0
    print(report(args, plan, phases, meta), flush=True)


if __name__ == "__main__":
    main()
