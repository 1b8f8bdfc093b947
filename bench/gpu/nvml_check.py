"""Real-GPU check of joulegate's sampler: does ``Sampler`` + ``NvmlSource`` measure what the counter says, and cheaply?

Runs on one NVIDIA GPU (written for an H100). The sampler reads the energy counter at 100 ms into memory while the GPU
goes through known phases: idle, a bf16 GEMM loop, idle, then a random-init Llama-3-8B-shaped model generating, then a
short idle tail. At every phase boundary the main thread reads the counter directly. It reports, per phase:

(a) the sampler's energy (last sample at or before each boundary) against the direct reads: they must agree within one
    counter step, since a sample can miss at most the update that landed between it and the boundary;
(b) ``nvmlDeviceGetPowerUsage`` (and the instant-power field) polled every 10 ms and integrated, for comparison only:
    on H100 the former is a lagging 1 s average, which is why joulegate attributes with the counter;
(c) what the sampler cost: thread CPU time / wall time, read latency p50/p99, cadence, missed ticks.

Run from the repository root (bench/gpu/README.md):  ``python3 -m bench.gpu.nvml_check --out DIR``.
It needs torch, transformers, pynvml and structlog; no weights are downloaded. Ends with one ``RESULT`` line.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import platform
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pynvml

from meter.sampler import Sampler
from meter.samples import Sample
from meter.sources.nvml import NvmlSource

INTERVAL_MS = 100
POWER_POLL_S = 0.010

# ---- pure analysis ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Boundary:
    name: str
    t_ns: int
    energy_mj: int  # counter read directly by the main thread at t_ns


@dataclass(frozen=True)
class PhaseResult:
    phase: str
    seconds: float
    direct_j: float
    sampler_j: float
    diff_j: float
    diff_pct: float
    step_j: float  # the largest counter step next to the phase's two boundaries, seen by the sampler
    within_step: bool
    avg_power_w: float
    power_usage_j: float | None  # integrated nvmlDeviceGetPowerUsage
    power_instant_j: float | None  # integrated NVML_FI_DEV_POWER_INSTANT


def last_at_or_before(samples: Sequence[tuple[int, int]], t_ns: int) -> int | None:
    """Index of the last (t_ns, energy_mj) sample taken at or before t_ns."""
    best = None
    for i, (t, _) in enumerate(samples):
        if t <= t_ns:
            best = i
        else:
            break
    return best


def next_step_mj(samples: Sequence[tuple[int, int]], i: int) -> int | None:
    """The counter increment at the first change after sample i (the update a boundary just after i can catch)."""
    for _, e in samples[i + 1 :]:
        if e != samples[i][1]:
            return e - samples[i][1]
    return None


def integrate_w(points: Sequence[tuple[int, float]], t0_ns: int, t1_ns: int) -> float | None:
    """Trapezoid integral in joules of (t_ns, watts) points over [t0, t1] (None without two points inside)."""
    inside = [(t, w) for t, w in points if t0_ns <= t <= t1_ns]
    if len(inside) < 2:
        return None
    energy_j = sum((w0 + w1) / 2 * (t1 - t0) / 1e9 for (t0, w0), (t1, w1) in itertools.pairwise(inside))
    covered_s = (inside[-1][0] - inside[0][0]) / 1e9
    return energy_j * ((t1_ns - t0_ns) / 1e9) / covered_s if covered_s > 0 else None  # scale the 10 ms edge gaps


def phase_result(
    start: Boundary,
    end: Boundary,
    samples: Sequence[tuple[int, int]],
    power_usage: Sequence[tuple[int, float]],
    power_instant: Sequence[tuple[int, float]],
) -> PhaseResult:
    i0, i1 = last_at_or_before(samples, start.t_ns), last_at_or_before(samples, end.t_ns)
    if i0 is None or i1 is None:
        raise ValueError(f"no sampler sample before the boundaries of {end.name}")
    direct_j = (end.energy_mj - start.energy_mj) / 1e3
    sampler_j = (samples[i1][1] - samples[i0][1]) / 1e3
    steps = [s for s in (next_step_mj(samples, i0), next_step_mj(samples, i1)) if s is not None]
    step_j = max(steps) / 1e3 if steps else math.nan
    diff_j = sampler_j - direct_j
    seconds = (end.t_ns - start.t_ns) / 1e9
    return PhaseResult(
        phase=end.name,
        seconds=seconds,
        direct_j=direct_j,
        sampler_j=sampler_j,
        diff_j=diff_j,
        diff_pct=100 * diff_j / direct_j if direct_j else math.nan,
        step_j=step_j,
        within_step=abs(diff_j) <= step_j + 1e-3 if steps else False,
        avg_power_w=direct_j / seconds if seconds > 0 else math.nan,
        power_usage_j=integrate_w(power_usage, start.t_ns, end.t_ns),
        power_instant_j=integrate_w(power_instant, start.t_ns, end.t_ns),
    )


def cadence(samples: Sequence[tuple[int, int]]) -> dict[str, float]:
    """Sampler spacing and how often consecutive reads saw the same counter value (aliasing with the counter)."""
    gaps_ms = sorted((b[0] - a[0]) / 1e6 for a, b in itertools.pairwise(samples))
    same = sum(1 for a, b in itertools.pairwise(samples) if a[1] == b[1])
    changes = [samples[i][0] for i in range(1, len(samples)) if samples[i][1] != samples[i - 1][1]]
    change_gaps_ms = [(b - a) / 1e6 for a, b in itertools.pairwise(changes)]
    return {
        "interval_ms_p50": statistics.median(gaps_ms),
        "interval_ms_p99": gaps_ms[min(len(gaps_ms) - 1, math.ceil(0.99 * len(gaps_ms)) - 1)],
        "interval_ms_max": gaps_ms[-1],
        "unchanged_reads_pct": 100 * same / len(gaps_ms),
        "counter_change_ms_median": statistics.median(change_gaps_ms) if change_gaps_ms else math.nan,
    }


def fmt(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


# ---- measurement -----------------------------------------------------------------------------------------------------


class PowerPoller:
    """Polls nvmlDeviceGetPowerUsage and the instant-power field every 10 ms on its own thread (each read ~us)."""

    def __init__(self, handle: object) -> None:
        self._handle = handle
        self.usage: list[tuple[int, float]] = []
        self.instant: list[tuple[int, float]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="power-poller", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)

    def _run(self) -> None:
        field = getattr(pynvml, "NVML_FI_DEV_POWER_INSTANT", 186)
        instant_ok = True
        while not self._stop.wait(POWER_POLL_S):
            try:
                self.usage.append((time.time_ns(), pynvml.nvmlDeviceGetPowerUsage(self._handle) / 1e3))
                if instant_ok:
                    fv = pynvml.nvmlDeviceGetFieldValues(self._handle, [field])[0]
                    if fv.nvmlReturn != 0:
                        instant_ok = False
                        continue
                    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}
                    value = getattr(fv.value, member.get(fv.valueType, "uiVal"))
                    self.instant.append((time.time_ns(), value / 1e3))  # mW
            except pynvml.NVMLError:
                self.errors += 1


def gemm_loop(seconds: float) -> dict[str, float]:
    import torch

    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    count = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(20):
            a @ b
        count += 20
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return {"gemms": count, "tflops": 2 * n**3 * count / elapsed / 1e12}


def build_model() -> object:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    )
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(torch.float32)
    return model.eval()


def generate(model: object, batch: int, prompt_tokens: int, new_tokens: int) -> int:
    import torch

    ids = torch.randint(0, 128256, (batch, prompt_tokens), device="cuda")
    with torch.inference_mode():
        out = model.generate(  # type: ignore[attr-defined]
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    torch.cuda.synchronize()
    return int(out.shape[1] - prompt_tokens) * batch


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="folder for nvml_check.json, samples.csv, power.csv")
    parser.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU (torch uses cuda:0)")
    parser.add_argument("--idle-s", type=float, default=2.0)
    parser.add_argument("--gemm-s", type=float, default=5.0)
    parser.add_argument("--model-s", type=float, default=5.0, help="keep generating until this much time has passed")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)

    import torch
    import transformers

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
    env = {
        "gpu": pynvml.nvmlDeviceGetName(handle),
        "uuid": pynvml.nvmlDeviceGetUUID(handle),
        "driver": pynvml.nvmlSystemGetDriverVersion(),
        "nvml": pynvml.nvmlSystemGetNVMLVersion(),
        "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    print("ENV", json.dumps(env), flush=True)
    torch.ones(1, device="cuda")  # open the CUDA context before the first idle phase: idle means "context open"

    collected: list[Sample] = []
    lock = threading.Lock()

    def sink(samples: list[Sample]) -> None:
        with lock:
            collected.extend(samples)

    source = NvmlSource([args.gpu])
    sampler = Sampler(source, sink, interval_ms=INTERVAL_MS)
    poller = PowerPoller(handle)
    boundaries: list[Boundary] = []
    notes: dict[str, object] = {}

    def mark(name: str) -> None:
        torch.cuda.synchronize()
        energy_mj = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        boundaries.append(Boundary(name, time.time_ns(), int(energy_mj)))
        print(f"  boundary {name:<8} t={time.time():.3f} counter={energy_mj} mJ", flush=True)

    def phase(name: str, work: Callable[[], object]) -> None:
        try:
            result = work()
            if result is not None:
                notes[name] = result
        except Exception:
            notes[f"{name}_error"] = traceback.format_exc()
            print(f"PHASE {name} FAILED\n{notes[f'{name}_error']}", flush=True)
        mark(name)

    sampler.start()
    poller.start()
    time.sleep(0.3)  # a few samples before the first boundary
    mark("start")
    phase("idle1", lambda: time.sleep(args.idle_s))
    phase("gemm", lambda: gemm_loop(args.gemm_s))
    phase("idle2", lambda: time.sleep(args.idle_s))

    model_state: dict[str, object] = {}

    def load_and_warm() -> dict[str, float]:
        t0 = time.perf_counter()
        model_state["model"] = build_model()
        built_s = time.perf_counter() - t0
        generate(model_state["model"], args.batch, args.prompt_tokens, 4)  # warm-up: kernels, cuBLAS workspace
        return {"build_s": built_s, "build_and_warmup_s": time.perf_counter() - t0}

    def serve() -> dict[str, float]:
        if "model" not in model_state:
            raise RuntimeError("model was not built")
        calls, tokens, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < args.model_s:
            tokens += generate(model_state["model"], args.batch, args.prompt_tokens, args.new_tokens)
            calls += 1
        elapsed = time.perf_counter() - t0
        return {
            "calls": calls,
            "output_tokens": tokens,
            "s_per_call": elapsed / calls,
            "ms_per_step": 1e3 * elapsed / calls / args.new_tokens,
        }

    phase("load", load_and_warm)
    phase("model", serve)
    model_state.clear()
    torch.cuda.empty_cache()
    phase("idle3", lambda: time.sleep(1.0))
    time.sleep(0.3)  # a few samples after the last boundary, so its next counter step is seen
    poller.stop()
    stopped = sampler.stop(5.0)
    stats = sampler.stats
    source.close()

    series = [(s.t_ns, s.energy_mj) for s in collected if s.energy_mj is not None]
    gaps = [s for s in collected if s.energy_mj is None]
    results = [phase_result(a, b, series, poller.usage, poller.instant) for a, b in itertools.pairwise(boundaries)]
    cad = cadence(series)

    print()
    print(
        f"{'phase':<7} {'s':>6} {'direct J':>9} {'sampler J':>9} {'diff J':>7} {'diff %':>7} {'step J':>7} "
        f"{'ok':>3} {'avg W':>6} {'PowerUsage J':>12} {'instant J':>9}"
    )
    for r in results:
        print(
            f"{r.phase:<7} {r.seconds:6.2f} {r.direct_j:9.1f} {r.sampler_j:9.1f} {r.diff_j:7.1f} {r.diff_pct:7.2f} "
            f"{fmt(r.step_j):>7} {'yes' if r.within_step else 'NO':>3} {r.avg_power_w:6.1f} "
            f"{fmt(r.power_usage_j):>12} {fmt(r.power_instant_j):>9}"
        )
    total_direct_j = (boundaries[-1].energy_mj - boundaries[0].energy_mj) / 1e3
    total_usage_j = integrate_w(poller.usage, boundaries[0].t_ns, boundaries[-1].t_ns)
    total_instant_j = integrate_w(poller.instant, boundaries[0].t_ns, boundaries[-1].t_ns)
    print(
        f"total   direct {total_direct_j:.1f} J, integrated PowerUsage {fmt(total_usage_j)} J, "
        f"integrated instant power {fmt(total_instant_j)} J"
    )
    print(f"sampler: {asdict(stats)}; stopped={stopped}; gaps={len(gaps)}; samples={len(series)}")
    print(f"cadence: {cad}")
    print(f"notes: { {k: v for k, v in notes.items() if not k.endswith('_error')} }")

    by_name = {r.phase: r for r in results}
    served = notes.get("model")
    if isinstance(served, dict) and "model" in by_name:
        j = by_name["model"].sampler_j
        print(
            f"model: {j / served['calls']:.1f} J per generate call (batch {args.batch}, {args.prompt_tokens} prompt + "
            f"{args.new_tokens} new tokens), {j / served['output_tokens']:.3f} J per output token incl. prefill, "
            f"{served['ms_per_step']:.1f} ms per decode step incl. prefill"
        )
    checked = [r for r in results if r.phase in ("idle1", "gemm", "idle2", "model")]
    worst_pct = max(abs(r.diff_pct) for r in checked)
    gemm, model = by_name["gemm"], by_name.get("model")
    model_ok = model is not None and "model_error" not in notes
    cpu_pct = 100 * stats.cpu_s / stats.wall_s if stats.wall_s else math.nan
    result_line = (
        f"RESULT sampler_vs_direct_pct={worst_pct:.2f} gemm_j={gemm.sampler_j:.1f} "
        f"gemm_power_w={gemm.sampler_j / gemm.seconds:.1f} model_j={model.sampler_j if model_ok else math.nan:.1f} "
        f"sampler_cpu_pct={cpu_pct:.3f} read_ms_p50={fmt(stats.read_ms_p50, 2)} "
        f"read_ms_p99={fmt(stats.read_ms_p99, 2)} "
        f"within_one_step={'yes' if all(r.within_step for r in checked) else 'no'}"
    )

    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "nvml_check.json").write_text(
            json.dumps(
                {
                    "env": env,
                    "boundaries": [asdict(b) for b in boundaries],
                    "phases": [asdict(r) for r in results],
                    "total": {"direct_j": total_direct_j, "power_usage_j": total_usage_j, "instant_j": total_instant_j},
                    "sampler": asdict(stats),
                    "cadence": cad,
                    "gaps": [asdict(g) for g in gaps],
                    "notes": notes,
                    "result": result_line,
                },
                indent=2,
                default=str,
            )
        )
        with (args.out / "samples.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_ns", "energy_mj", "error"])
            w.writerows((s.t_ns, s.energy_mj, s.error or "") for s in collected)
        with (args.out / "power.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["t_ns", "kind", "watts"])
            w.writerows((t, "usage", p) for t, p in poller.usage)
            w.writerows((t, "instant", p) for t, p in poller.instant)
    print(result_line, flush=True)
    pynvml.nvmlShutdown()
    return 0 if stopped and model_ok else 1


if __name__ == "__main__":
    sys.exit(main())
