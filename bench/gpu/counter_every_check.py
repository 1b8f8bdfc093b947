"""joulegate's own NVML source and sampler with ``counter_every`` 1 and 10, on a GPU under a bursty load: what the
sampler thread costs, that the spread readings behave (the instant power read, in order, every counter read kept),
and what a stop leaves unstored.

    python -m bench.gpu.counter_every_check [--gpu 0] [--seconds 8] [--rounds 2]

Each of ``--rounds`` rounds runs counter_every 1, 10, and 10 again through a wrapper without ``settle`` (so the
sampler stops it as before the settle fix), ``--seconds`` each, while ``bench.gpu.nvml_read_cost``'s bursty GEMM
runs (on and off every 50-400 ms). Right after each ``sampler.stop`` the counter is read once more, directly: the
stop tail (tail_ms, tail_mj) is how far the last stored reading is behind it. Needs pynvml, structlog and torch
(bench/gpu/README.md: carry a structlog wheel). The last line is ``RESULT every1_cpu_pct=... every10_cpu_pct=...
node8_every10_cpu_pct=... power_read_ok_pct=... in_order=... every10_tail_ms_max=... unsettled_tail_ms_max=...``
(cpu_pct: the sampler thread's CPU as a share of one core, medians over rounds of the settled runs; node8: x8 GPUs;
tail_ms_max: over rounds).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

from bench.gpu.nvml_read_cost import BurstyGemm
from meter.sampler import Sampler
from meter.samples import EnergySource, Sample, SettlingSource
from meter.sources import nvml
from meter.sources.nvml import NvmlSource


class WithoutSettle:
    """An ``NvmlSource`` without ``settle``: a stopping sampler leaves its held ticks unstored (before the fix)."""

    def __init__(self, source: NvmlSource) -> None:
        self._source = source

    @property
    def devices(self) -> tuple[str, ...]:
        return self._source.devices

    def read(self) -> list[Sample]:
        return self._source.read()

    def close(self) -> None:
        self._source.close()


def run(gpu: int, every: int, seconds: float, settle: bool) -> tuple[float, list[Sample], Sample]:
    """The sampler thread's CPU (% of a core), the samples stored, and a counter read made right after the stop."""
    source = NvmlSource([gpu], counter_every=every)
    sampled: EnergySource = source if settle else WithoutSettle(source)
    assert isinstance(sampled, SettlingSource) == settle
    handle = nvml.pynvml.nvmlDeviceGetHandleByIndex(gpu)
    got: list[Sample] = []
    sampler = Sampler(sampled, got.extend, interval_ms=100, phase_lock=every == 1)
    sampler.start()
    time.sleep(seconds)
    sampler.stop(2.0)
    direct = nvml._read_counter(source.devices[0], handle)  # stamped with time.time_ns() as the read returns
    stats = sampler.stats
    source.close()
    return 100 * stats.cpu_s / stats.wall_s, got, direct


def stop_tail(good: list[Sample], direct: Sample) -> tuple[float, int]:
    """(ms, mJ) from the last stored reading to the counter read after the stop."""
    last = good[-1]
    if direct.energy_mj is None or last.energy_mj is None:
        raise RuntimeError(f"no counter read to measure the stop tail against: {direct.error}")
    return (direct.t_ns - last.t_ns) / 1e6, direct.energy_mj - last.energy_mj


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cpu: dict[int, list[float]] = {1: [], 10: []}
    tails_ms: dict[tuple[int, bool], list[float]] = {(1, True): [], (10, True): [], (10, False): []}
    in_order = True
    power_ok = []
    with BurstyGemm(args.gpu):
        for _ in range(args.rounds):
            for every, settle in tails_ms:
                pct, samples, direct = run(args.gpu, every, args.seconds, settle)
                if settle:
                    cpu[every].append(pct)
                good = [s for s in samples if s.energy_mj is not None]
                in_order &= all(a.t_ns < b.t_ns for a, b in itertools.pairwise(samples))
                in_order &= all(a.energy_mj <= b.energy_mj for a, b in itertools.pairwise(good))  # type: ignore[operator]
                tail_ms, tail_mj = stop_tail(good, direct)
                tails_ms[every, settle].append(tail_ms)
                print(f"counter_every={every:2d} settle={int(settle)} sampler_cpu_pct={pct:.2f} samples={len(samples)} "
                      f"good={len(good)} tail_ms={tail_ms:.1f} tail_mj={tail_mj}", flush=True)  # fmt: skip
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
        f"power_read_ok_pct={100 * sum(power_ok) / len(power_ok):.0f} in_order={int(in_order)} "
        f"every10_tail_ms_max={max(tails_ms[10, True]):.1f} unsettled_tail_ms_max={max(tails_ms[10, False]):.1f}"
    )


if __name__ == "__main__":
    main()
