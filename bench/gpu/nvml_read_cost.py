"""What one read of a GPU's energy counter costs, through NVML's two doors to the same counter, and whether they agree.

    python -m bench.gpu.nvml_read_cost [--gpu 0] [--ticks 50] [--no-load]

The sampler reads ``nvmlDeviceGetTotalEnergyConsumption`` once per GPU per 100 ms tick; on an H100 one read is
~3.6 ms of CPU (bench/gpu/README.md), so a node of 8 GPUs would spend ~30 % of a core on it, against issue 12's
budget of 10 % for the whole meter. ``../shared/measurements/gpu.md`` says the counter is also field 83 of
``nvmlDeviceGetFieldValues`` and that field reads cost microseconds. This measures, on one GPU, idle and under a
bf16 GEMM loop (torch, when importable):

- the CPU (``time.thread_time``) and wall time of one read, each way, at the sampler's cadence (a read every 100 ms)
  and back to back;
- agreement: each tick reads the counter one way and at once the other (alternating which goes first); the two
  agree when they show the same value, or values one counter update apart (the update fell between the two reads:
  then the later read shows the higher value);
- that field 83 is live: how many distinct values each way saw (the counter advances every ~100 ms);
- whether cheap reads can stand in for most counter reads: under a bursty GEMM load (on and off for 50-400 ms at
  random), every 100 ms tick reads the counter (the truth) and the instant power field (186, microseconds); then the
  counter is kept only every ``--hybrid-every`` ticks and each kept delta is spread over its ticks' intervals by the
  instant power read at each interval's end, or evenly (the control without power). Each interval's
  estimate is compared with the counter's own delta: the median and p90 of the error, as a share of the median
  interval's energy.

It imports only stdlib, pynvml and (optionally) torch, so it runs on the bare GPU image. The last line is
``RESULT energy_cpu_ms_p50=... field_cpu_ms_p50=... field_agrees_pct=... node8_energy_cpu_pct=...
node8_field_cpu_pct=... power_cpu_ms_p50=... hybrid_err_pct_p50=... hybrid_err_pct_p90=... even_err_pct_p50=...
even_err_pct_p90=... node8_hybrid_cpu_pct=...`` (node8_*: 8 GPUs read at 10 Hz, as a share of one core, from the
per-read CPU at cadence; hybrid: a counter read every ``--hybrid-every`` ticks and a power read every tick).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import pynvml

FIELD_TOTAL_ENERGY = 83  # NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION: the same counter, in mJ
FIELD_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT, mW
TICK_S = 0.1


def read_energy(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetTotalEnergyConsumption(handle))


def read_field(handle: Any) -> int:
    [value] = pynvml.nvmlDeviceGetFieldValues(handle, [FIELD_TOTAL_ENERGY])
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(value.nvmlReturn)
    return int(value.value.ullVal)


_VALUE_MEMBER = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal"}  # nvmlValueType_t


def read_power_mw(handle: Any) -> int:
    [value] = pynvml.nvmlDeviceGetFieldValues(handle, [FIELD_POWER_INSTANT])
    if value.nvmlReturn != pynvml.NVML_SUCCESS:
        raise pynvml.NVMLError(value.nvmlReturn)
    return int(getattr(value.value, _VALUE_MEMBER[value.valueType]))


def timed(read: Callable[[Any], int], handle: Any) -> tuple[int, float, float]:
    """(value, CPU ms, wall ms) of one read."""
    c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
    v = read(handle)
    return v, (time.thread_time_ns() - c0) / 1e6, (time.perf_counter_ns() - w0) / 1e6


def cost(read: Callable[[Any], int], handle: Any, n: int, spaced: bool) -> dict[str, float]:
    cpu, wall = [], []
    next_s = time.monotonic()
    for _ in range(n):
        if spaced:
            next_s += TICK_S
            time.sleep(max(0.0, next_s - time.monotonic()))
        _, c, w = timed(read, handle)
        cpu.append(c)
        wall.append(w)
    cpu.sort()
    wall.sort()
    return {
        "cpu_ms_p50": statistics.median(cpu),
        "cpu_ms_mean": statistics.fmean(cpu),
        "wall_ms_p50": statistics.median(wall),
        "wall_ms_p99": wall[min(len(wall) - 1, int(0.99 * len(wall)))],
    }


def agreement(handle: Any, ticks: int) -> dict[str, float]:
    agree = same = 0
    diffs = []
    energy_values, field_values = set(), set()
    next_s = time.monotonic()
    for k in range(ticks):
        next_s += TICK_S
        time.sleep(max(0.0, next_s - time.monotonic()))
        if k % 2 == 0:
            first, second = read_energy(handle), read_field(handle)
            e, f = first, second
        else:
            first, second = read_field(handle), read_energy(handle)
            f, e = first, second
        energy_values.add(e)
        field_values.add(f)
        diffs.append(f - e)
        same += e == f
        agree += e == f or second > first  # the counter may update between the two reads, never run backwards
    return {
        "agrees_pct": 100 * agree / ticks,
        "same_pct": 100 * same / ticks,
        "max_abs_diff_mj": max(abs(d) for d in diffs),
        "distinct_energy": len(energy_values),
        "distinct_field": len(field_values),
    }


class Gemm:
    """A bf16 GEMM loop on the GPU in a background thread (torch releases the GIL while the GPU works)."""

    def __init__(self, gpu: int) -> None:
        import torch

        self._torch = torch
        self._device = torch.device("cuda", gpu)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        torch = self._torch
        a = torch.randn(8192, 8192, device=self._device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=self._device, dtype=torch.bfloat16)
        while not self._stop.is_set():
            for _ in range(20):
                a @ b
            torch.cuda.synchronize(self._device)

    def __enter__(self) -> Gemm:
        self._thread.start()
        time.sleep(2.0)  # clocks and power up
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class BurstyGemm(Gemm):
    """The GEMM loop switched on and off for 50-400 ms at random (seeded): power that moves within a second."""

    def _run(self) -> None:
        import random

        torch = self._torch
        rng = random.Random(7)
        a = torch.randn(4096, 4096, device=self._device, dtype=torch.bfloat16)
        b = torch.randn(4096, 4096, device=self._device, dtype=torch.bfloat16)
        while not self._stop.is_set():
            until = time.monotonic() + rng.uniform(0.05, 0.4)
            while time.monotonic() < until:
                a @ b
                torch.cuda.synchronize(self._device)
            self._stop.wait(rng.uniform(0.05, 0.4))


def hybrid(handle: Any, ticks: int, every: int, dump: str | None = None) -> dict[str, float]:
    """Counter and instant power at every tick; the counter kept every ``every`` ticks, spread by power or evenly."""
    t, e, p = [], [], []
    power_cpu = []
    next_s = time.monotonic()
    for _ in range(ticks + 1):
        next_s += TICK_S
        time.sleep(max(0.0, next_s - time.monotonic()))
        e.append(read_energy(handle))
        t.append(time.monotonic_ns())
        mw, cpu_ms, _ = timed(read_power_mw, handle)
        p.append(mw)
        power_cpu.append(cpu_ms)
    if dump:
        import json

        with open(dump, "w") as f:
            json.dump({"t_ns": t, "energy_mj": e, "power_mw": p}, f)
    truth = [e[i + 1] - e[i] for i in range(ticks)]
    by_power: list[float] = []
    even: list[float] = []
    for lo in range(0, ticks - every + 1, every):
        hi = lo + every
        delta = e[hi] - e[lo]
        # the power read at an interval's end describes it: NVML's instant power and counter update together, and
        # the reading after an interval correlates 0.93 with its energy (the one before it, 0.18; both ends, worse)
        weights = [p[i + 1] * (t[i + 1] - t[i]) for i in range(lo, hi)]
        total = sum(weights) or 1.0
        by_power += [delta * w / total for w in weights]
        even += [delta / every] * every
    n = len(by_power)
    scale = statistics.median(truth[:n]) or 1.0

    def errs(est: list[float]) -> list[float]:
        return sorted(abs(x - y) / scale * 100 for x, y in zip(est, truth[:n], strict=True))

    h, u = errs(by_power), errs(even)
    return {
        "power_cpu_ms_p50": statistics.median(power_cpu),
        "hybrid_err_pct_p50": statistics.median(h),
        "hybrid_err_pct_p90": h[int(0.9 * (len(h) - 1))],
        "even_err_pct_p50": statistics.median(u),
        "even_err_pct_p90": u[int(0.9 * (len(u) - 1))],
        "median_interval_mj": scale,
        "intervals": n,
    }


def measure(handle: Any, ticks: int, label: str) -> dict[str, dict[str, float]]:
    out = {
        "energy@100ms": cost(read_energy, handle, ticks, spaced=True),
        "field@100ms": cost(read_field, handle, ticks, spaced=True),
        "energy_burst": cost(read_energy, handle, ticks, spaced=False),
        "field_burst": cost(read_field, handle, ticks * 10, spaced=False),
        "agreement": agreement(handle, ticks),
    }
    for name, figures in out.items():
        print(f"{label:5s} {name:13s} " + " ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--ticks", type=int, default=50, help="reads per measurement (x10 back to back)")
    parser.add_argument("--no-load", action="store_true", help="idle only (no torch GEMM phase)")
    parser.add_argument("--hybrid-ticks", type=int, default=300, help="ticks of the bursty hybrid test (0: skip)")
    parser.add_argument("--hybrid-every", type=int, default=10, help="keep the counter every this many ticks")
    parser.add_argument("--dump", help="write the hybrid test's raw reads (JSON) here")
    args = parser.parse_args()
    mixed: dict[str, float] | None = None
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
        name = pynvml.nvmlDeviceGetName(handle)
        print(f"bench.gpu.nvml_read_cost: {name}, driver {pynvml.nvmlSystemGetDriverVersion()}", flush=True)
        phases = {"idle": measure(handle, args.ticks, "idle")}
        if not args.no_load:
            try:
                gemm = Gemm(args.gpu)
            except ImportError:
                print("(no torch: idle only)")
            else:
                with gemm:
                    phases["load"] = measure(handle, args.ticks, "load")
                if args.hybrid_ticks:
                    with BurstyGemm(args.gpu):
                        mixed = hybrid(handle, args.hybrid_ticks, args.hybrid_every, args.dump)
                    print("burst hybrid        " + " ".join(f"{k}={v:.4g}" for k, v in mixed.items()), flush=True)
    finally:
        pynvml.nvmlShutdown()
    energy_cpu = max(p["energy@100ms"]["cpu_ms_p50"] for p in phases.values())
    field_cpu = max(p["field@100ms"]["cpu_ms_p50"] for p in phases.values())
    agrees = min(p["agreement"]["agrees_pct"] for p in phases.values())
    per_node = 8 * 10 / 1000 * 100  # 8 GPUs x 10 reads/s, ms of CPU per s -> % of a core
    line = (
        f"RESULT energy_cpu_ms_p50={energy_cpu:.3f} field_cpu_ms_p50={field_cpu:.4f} field_agrees_pct={agrees:.1f} "
        f"node8_energy_cpu_pct={energy_cpu * per_node:.2f} node8_field_cpu_pct={field_cpu * per_node:.3f}"
    )
    if mixed is not None:
        hybrid_ms = energy_cpu / args.hybrid_every + mixed["power_cpu_ms_p50"]  # CPU per tick per GPU
        line += (
            f" power_cpu_ms_p50={mixed['power_cpu_ms_p50']:.4f} hybrid_err_pct_p50={mixed['hybrid_err_pct_p50']:.1f}"
            f" hybrid_err_pct_p90={mixed['hybrid_err_pct_p90']:.1f} even_err_pct_p50={mixed['even_err_pct_p50']:.1f}"
            f" even_err_pct_p90={mixed['even_err_pct_p90']:.1f} node8_hybrid_cpu_pct={hybrid_ms * per_node:.2f}"
        )
    print(line)


if __name__ == "__main__":
    main()
