"""Arrival shaping on a real GPU: passthrough against the best shaped policies, through the gateway, NVML-metered.

    python3 -m bench.gpu.shaping_gpu --out $OUT                                  # on a GPU machine (H100)
    python3 -m bench.gpu.shaping_gpu --out /tmp/sg --tiny --meter none           # dry run on a CPU
    python3 -m bench.gpu.shaping_gpu --out /tmp/sg --backend sim --meter sim     # dry run of the energy path

One process each: the reference backend (``bench.gpu.reference_backend``: TGI's HTTP API over transformers'
continuous batching, random-init Llama-3-8B-shaped model, bf16) on the GPU; ``joulegate serve`` in front of it with
the in-process NVML meter (``gpus = [0]``), SQLite and 1 s epochs, and one traffic class per policy; and this driver,
which sends Poisson traces over gRPC at low, medium and high load. Per load the shaped policies run with passthrough
between them (order alternating from load to load), one after the other on the one GPU, each in its own window of
whole epochs that starts with the GPU idle; every run of a load is metered over a window of the same length. Energy
comes from the gateway's ``EnergyReports`` (``GetBackendEnergy{start,end}``: counter, attributed and idle joules;
``ListRequests``: per-request attributed joules and gateway timestamps).

The reference backend is slow (~13 tokens/s for one request, ~240 tokens/s for 32; see README), so generations are
short (16-48 new tokens) and traces 30 s. ``--budget-s`` bounds the whole run: a run that would end past the budget
is skipped, so the windows that did run are still metered and written. Writes ``shaping_gpu.md``, ``.csv`` and
``.json``, ``gateway.log``, ``server.log`` under ``--out``; prints the table and

    RESULT j_per_request_ratio=<best shaped / passthrough at low load> ttft_p95_over_bound=<its TTFT p95 / bound>
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path

import grpc

from bench._procs import _wait_grpc, create_admin_key, free_port
from bench.gpu.reference_tokenizer import WordTokenizer
from bench.shaping_config import GatewayBackend, gateway_config, toml_dumps
from bench.shaping_drive import WindowEnergy, epoch_ceil_ns, read_window, sleep_until_ns, wait_attributed
from bench.shaping_report import (
    PolicySpec,
    RunRow,
    best_shaped,
    csv_text,
    markdown_table,
    result_line,
    standard_policies,
    summarize,
    text_table,
)
from bench.shaping_runs import RunRecord, Scenario, assign_windows, measure, run_lane
from bench.shaping_trace import Lengths, make_trace
from meter.pb.joulegate.v1 import energy_pb2_grpc as epbg
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg

RATES_PER_S = {"low": 0.4, "medium": 1.5, "high": 4.0}
LENGTHS = Lengths(prompt_min_tokens=200, prompt_max_tokens=800, new_min_tokens=16, new_max_tokens=48)
BOUND_MS = 2000.0
SERVICE_MS = 500.0  # 8 released together reached their first token in 0.18-0.32 s, 32 in ~0.75-1 s (README)
LONG_BOUND_MS = 8000.0
PREFILL_TOKENS = 8192  # the manager's tokens per forward (max_batch_tokens)
EPOCH_S = 1.0
NS_PER_S = 1_000_000_000


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"backend exited with {proc.returncode} before answering {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer in {timeout_s:.0f} s")


@contextlib.contextmanager
def _process(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _backend_cmd(args: argparse.Namespace, port: int) -> list[str]:
    py = args.backend_python or sys.executable
    if args.backend == "sim":
        return [py, "-m", "app.cli", "sim-tgi", "--port", str(port), "--counter-lag-ms", "100", "--name", "sim0"]
    cmd = [py, "-m", "bench.gpu.reference_backend", "--port", str(port)]
    if args.tiny:
        cmd += ["--tiny", "--device", "cpu"]
    return cmd


def plan_runs(scenarios: Sequence[Scenario], policies: Sequence[PolicySpec]) -> list[tuple[Scenario, PolicySpec]]:
    """Per scenario: the shaped policies with passthrough between each two (and at the end when there is one shaped
    policy), the shaped order reversed from one scenario to the next, so no policy always runs first."""
    base = next(p for p in policies if not p.shaped)
    shaped = [p for p in policies if p.shaped]
    out: list[tuple[Scenario, PolicySpec]] = []
    for i, s in enumerate(scenarios):
        order = shaped if i % 2 == 0 else shaped[::-1]
        seq: list[PolicySpec] = []
        for k, p in enumerate(order):
            seq.append(p)
            if k == 0 or k < len(order) - 1:
                seq.append(base)
        out += [(s, p) for p in seq]
    return out


def _gpu_info() -> dict[str, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(h)
        return {
            "gpu": name.decode() if isinstance(name, bytes) else str(name),
            "driver": str(pynvml.nvmlSystemGetDriverVersion()),
            "power_limit_w": f"{pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000:.0f}",
        }
    except Exception as exc:  # no GPU (dry run): say so in the output
        return {"gpu": f"none ({type(exc).__name__})"}


async def _warm_up(stub: pbg.GenerationServiceStub, model_id: str, md: tuple[tuple[str, str], ...],
                   tok: WordTokenizer) -> None:  # fmt: skip
    """One request alone, then 8 together: the first batched round of a fresh server is its slowest (README)."""

    async def one(i: int) -> None:
        req = pb.SingleGenerationRequest(
            model_id=model_id,
            request=pb.GenerationRequest(text=tok.prompt(300, 10_000 + i)),
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=8)),
        )
        async for _ in stub.GenerateStream(req, metadata=md, timeout=120):
            pass

    await one(0)
    await asyncio.gather(*(one(i) for i in range(1, 9)))


async def _bench(args: argparse.Namespace, port: int, admin_key: str, scenarios: list[Scenario],
                 policies: list[PolicySpec], t0: float) -> tuple[list[RunRow], list[str], float | None]:  # fmt: skip
    tok = WordTokenizer(args.vocab)
    md = (("authorization", f"Bearer {admin_key}"),)
    epoch_ns = round(EPOCH_S * NS_PER_S)
    metered = args.meter != "none"
    skipped: list[str] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.GenerationServiceStub(ch)
        reports = epbg.EnergyReportsStub(ch)
        await _warm_up(stub, scenarios[0].model_id, md, tok)
        # an idle window: the GPU's floor with the model loaded and the engine waiting
        idle_start = epoch_ceil_ns(time.time_ns() + NS_PER_S // 2, epoch_ns)
        idle_end = idle_start + round(args.idle_s) * epoch_ns
        await sleep_until_ns(idle_end)
        print(f"[{time.monotonic() - t0:5.0f} s] warmed up; idle window measured", flush=True)

        def progress(rec: RunRecord) -> None:
            errs = sum(c.error is not None for c in rec.clients)
            print(f"[{time.monotonic() - t0:5.0f} s] {rec.scenario.trace.name:15s} {rec.policy.name:12s} "
                  f"{len(rec.clients):3d} requests, {errs} errors, {(rec.last_done_ns - rec.start_ns) / 1e9:5.1f} s",
                  flush=True)  # fmt: skip

        records = await run_lane(
            stub,
            plan_runs(scenarios, policies),
            epoch_ns=epoch_ns,
            tail_s=args.tail_s,
            prompt_of=tok.prompt,
            metadata=md,
            on_done=progress,
            deadline_ns=time.time_ns() + round((args.budget_s - (time.monotonic() - t0) - 25) * NS_PER_S),
            on_skip=lambda s, p: skipped.append(f"{s.trace.name}/{p.name}"),
        )
        assign_windows(records, epoch_ns)
        idle_w: float | None = None
        if metered:
            windows = await measure(reports, md, records)
            await wait_attributed(reports, md, {scenarios[0].backend: idle_end})
            idle = await read_window(
                reports, md, backend=scenarios[0].backend, model_id="-", start_ns=idle_start, end_ns=idle_end
            )
            idle_w = idle.counter_j / ((idle_end - idle_start) / NS_PER_S)
        else:
            windows = [
                WindowEnergy(r.start_ns, r.window_end_ns, math.nan, math.nan, math.nan, 0, 0, ()) for r in records
            ]
    rows = [
        summarize(
            trace=r.scenario.trace.kind,
            load=r.scenario.trace.load,
            rate_per_s=r.scenario.trace.rate_per_s,
            policy=r.policy,
            clients=r.clients,
            window=w,
            notes=r.notes,
        )
        for r, w in zip(records, windows, strict=True)
    ]
    return rows, skipped, idle_w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--backend", choices=("reference", "sim"), default="reference")
    ap.add_argument("--backend-python", default=None, help="python for the backend (default: this one)")
    ap.add_argument("--tiny", action="store_true", help="reference backend: tiny model on the CPU (dry run)")
    ap.add_argument("--meter", choices=("nvml", "sim", "none"), default="nvml")
    ap.add_argument("--policies", default="adaptive,batch-long", help="shaped classes to compare with passthrough")
    ap.add_argument("--loads", default="low,medium,high")
    ap.add_argument("--rates", default=None, help="req/s per load, comma-separated (default 0.4,1.5,4)")
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--tail-s", type=float, default=5.0)
    ap.add_argument("--idle-s", type=float, default=3.0, help="idle window before the runs (whole epochs)")
    ap.add_argument("--budget-s", type=float, default=540.0, help="the whole run, start-up included")
    ap.add_argument("--seed", type=int, default=20261126)
    args = ap.parse_args()
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    from common.logs import configure_logging

    configure_logging("warning", "console")
    loads = args.loads.split(",")
    rates = dict(RATES_PER_S)
    if args.rates:
        rates.update(zip(loads, (float(x) for x in args.rates.split(",")), strict=True))
    wanted = {"passthrough", *args.policies.split(",")}
    policies = [
        p
        for p in standard_policies(BOUND_MS, SERVICE_MS, PREFILL_TOKENS, long_bound_ms=LONG_BOUND_MS)
        if p.name in wanted
    ]
    args.vocab = 2048 if args.tiny else 128_256
    model_id = "llama-3-8b-random"
    traces = [make_trace("poisson", load, rates[load], args.duration_s, args.seed, LENGTHS) for load in loads]
    scenarios = [Scenario(t, model_id, "gpu0") for t in traces]
    gpu = _gpu_info()
    print(f"GPU: {gpu}; traces: " + ", ".join(f"{t.name} {t.rate_per_s:g} req/s x {len(t.arrivals)}" for t in traces))
    work = Path(os.environ.get("TMPDIR", "/tmp")) / f"shaping_gpu_{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    backend_port, gw_port = free_port(), free_port()
    db_url = f"sqlite:///{work / 'joulegate.db'}"
    with _process(_backend_cmd(args, backend_port), args.out / "server.log") as backend:
        _wait_http(f"http://127.0.0.1:{backend_port}/health", backend, 300)
        print(f"[{time.monotonic() - t0:5.0f} s] backend up ({args.backend})", flush=True)
        admin_key = create_admin_key(db_url)
        gpus = (0,) if args.meter == "nvml" else ()
        cfg = gateway_config(
            backends=[GatewayBackend(model_id, f"http://127.0.0.1:{backend_port}", "gpu0", gpus)],
            policies=policies,
            db_url=db_url,
            journal_path=str(work / "journal.jsonl"),
            grpc_listen=f"127.0.0.1:{gw_port}",
            meter_source=args.meter,
            epoch_s=EPOCH_S,
        )
        (args.out / "gateway.toml").write_text(toml_dumps(cfg))
        gw_cmd = [sys.executable, "-m", "app.cli", "serve", "--config", str(args.out / "gateway.toml")]
        with _process(gw_cmd, args.out / "gateway.log") as gw:
            _wait_grpc(gw_port, 60)
            if gw.poll() is not None:
                raise RuntimeError("gateway exited")
            print(f"[{time.monotonic() - t0:5.0f} s] gateway up", flush=True)
            rows, skipped, idle_w = asyncio.run(_bench(args, gw_port, admin_key, scenarios, policies, t0))
            # written before the processes stop: a slow shutdown must not cost the results
            _write(args, rows, skipped, idle_w, gpu, traces, policies, time.monotonic() - t0)


def _write(args: argparse.Namespace, rows: list[RunRow], skipped: list[str], idle_w: float | None,
           gpu: dict[str, str], traces: list, policies: list[PolicySpec], wall_s: float) -> None:  # fmt: skip
    print()
    print(text_table(rows, include_truth=False))
    for r in rows:
        for note in r.notes:
            print(f"note: {r.trace} {r.load} {r.policy}: {note}")
    lines = []
    for load in dict.fromkeys(r.load for r in rows):
        b = best_shaped(rows, "poisson", load)
        if b is None:
            lines.append(f"- {load}: no shaped policy within its bound")
            continue
        lines.append(
            f"- {load}: `{b.row.policy}` {b.row.j_per_request:.1f} vs {b.baseline.j_per_request:.1f} J/request = "
            f"x{b.j_ratio:.2f} (attributed x{b.attr_ratio:.2f}), TTFT p95 {b.row.ttft_p95_ms:.0f} ms = "
            f"{b.ttft_over_bound:.2f} of its {b.row.bound_ms:.0f} ms bound"
        )
    result = result_line(best_shaped(rows, "poisson", "low"))
    idle = f"{idle_w:.1f} W" if idle_w is not None else "not measured"
    head = [
        f"GPU: {gpu}; wall {wall_s:.0f} s; idle floor (model loaded, engine waiting): {idle}",
        f"traces: poisson, {args.duration_s:.0f} s, {LENGTHS.describe()}; "
        + ", ".join(f"{t.load} {t.rate_per_s:g} req/s ({len(t.arrivals)} requests)" for t in traces),
        "policies: "
        + "; ".join(f"{p.name} ({p.note}{f', bound {p.bound_ms:.0f} ms' if p.bound_ms else ''})" for p in policies),
        "skipped (budget): " + (", ".join(skipped) if skipped else "none"),
    ]
    print("\n".join(head))
    print("\n".join(lines))
    md = ["# Arrival shaping on a GPU", "", *(f"- {h}" for h in head), "", markdown_table(rows, include_truth=False),
          "", *lines, "", "```", result, "```", ""]  # fmt: skip
    (args.out / "shaping_gpu.md").write_text("\n".join(md))
    (args.out / "shaping_gpu.csv").write_text(csv_text(rows))
    doc = {"gpu": gpu, "idle_w": idle_w, "wall_s": wall_s, "skipped": skipped, "rows": [asdict(r) for r in rows]}
    (args.out / "shaping_gpu.json").write_text(json.dumps(doc, indent=1, default=str))
    print(result, flush=True)


if __name__ == "__main__":
    main()
