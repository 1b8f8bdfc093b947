"""joulegate's own NVML source and sampler with ``counter_every`` 1 and 10, on a GPU under a bursty load: what the
sampler thread costs, and that the spread readings behave (the instant power read, in order, every counter read
kept).

    python -m bench.gpu.counter_every_check [--gpu 0] [--seconds 8] [--rounds 2]

Alternates the two settings ``--rounds`` times, ``--seconds`` each, while ``bench.gpu.nvml_read_cost``'s bursty GEMM
runs (on and off every 50-400 ms). Needs pynvml, structlog and torch (bench/gpu/README.md: carry a structlog wheel).
The last line is ``RESULT every1_cpu_pct=... every10_cpu_pct=... node8_every10_cpu_pct=... power_read_ok_pct=...
in_order=...`` (cpu_pct: the sampler thread's CPU as a share of one core, medians over rounds; node8: x8 GPUs).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from bench.gpu.nvml_read_cost import BurstyGemm
from meter.sampler import Sampler
from meter.samples import Sample
from meter.sources import nvml
from meter.sources.nvml import NvmlSource


def run(gpu: int, every: int, seconds: float) -> tuple[float, list[Sample]]:
    source = NvmlSource([gpu], counter_every=every)
    got: list[Sample] = []
    sampler = Sampler(source, got.extend, interval_ms=100, phase_lock=every == 1)
    sampler.start()
    time.sleep(seconds)
    sampler.stop(2.0)
    stats = sampler.stats
    source.close()
    return 100 * stats.cpu_s / stats.wall_s, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cpu: dict[int, list[float]] = {1: [], 10: []}
    in_order = True
    power_ok = []
    with BurstyGemm(args.gpu):
        for _ in range(args.rounds):
            for every in (1, 10):
                pct, samples = run(args.gpu, every, args.seconds)
                cpu[every].append(pct)
                good = [s for s in samples if s.energy_mj is not None]
                in_order &= all(a.t_ns < b.t_ns for a, b in itertools.pairwise(samples))
                in_order &= all(a.energy_mj <= b.energy_mj for a, b in itertools.pairwise(good))  # type: ignore[operator]
                print(f"counter_every={every:2d} sampler_cpu_pct={pct:.2f} samples={len(samples)} good={len(good)}",
                      flush=True)  # fmt: skip
    nvml._init()
    try:
        handle = nvml.pynvml.nvmlDeviceGetHandleByIndex(args.gpu)
        reads = [nvml._power_mw(handle) for _ in range(20)]
    finally:
        nvml.pynvml.nvmlShutdown()
    power_ok = [r is not None and 20_000 < r < 2_000_000 for r in reads]  # a GPU draws 20 W to 2 kW
    print(f"instant power reads (mW): {reads[:5]}")
    e1, e10 = statistics.median(cpu[1]), statistics.median(cpu[10])
    print(
        f"RESULT every1_cpu_pct={e1:.2f} every10_cpu_pct={e10:.2f} node8_every10_cpu_pct={8 * e10:.2f} "
        f"power_read_ok_pct={100 * sum(power_ok) / len(power_ok):.0f} in_order={int(in_order)}"
    )


if __name__ == "__main__":
    main()
