"""Does the sampler's phase lock keep NVML reads off the counter's update instants? Off vs on, same GPU, one run.

For each setting the sampler reads one GPU's energy counter every 100 ms for ``--seconds`` while the GPU idles and
then runs a matmul loop; a *stale* read is one that returns the previous value (the counter had not updated since
the last tick). Stale reads (and the double steps after them) are the timing noise the lock removes.

    python3 -m bench.gpu.phase_lock_check [--seconds 8]
Last line: RESULT stale_reads_off=… stale_reads_on=… phase_shifts_on=… reads_each=…
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time

from meter.sampler import Sampler
from meter.samples import Sample
from meter.sources.nvml import NvmlSource


def _load(stop: threading.Event) -> None:
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    while not stop.is_set():
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()
        time.sleep(0.05)  # bursts: the counter's steps vary in size


def _run(phase_lock: bool, seconds: float) -> tuple[int, int, int]:
    samples: list[Sample] = []
    source = NvmlSource([0])
    sampler = Sampler(source, samples.extend, interval_ms=100, phase_lock=phase_lock)
    stop = threading.Event()
    worker = threading.Thread(target=_load, args=(stop,), daemon=True)
    sampler.start()
    time.sleep(seconds / 2)
    worker.start()
    time.sleep(seconds / 2)
    stop.set()
    sampler.stop(5)
    worker.join(10)
    source.close()
    values = [s.energy_mj for s in samples if s.energy_mj is not None]
    stale = sum(1 for a, b in itertools.pairwise(values) if a == b)
    return stale, sampler.stats.phase_shifts, len(values)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args()
    stale_off, _, reads_off = _run(False, args.seconds)
    stale_on, shifts_on, reads_on = _run(True, args.seconds)
    print(f"phase lock off: {stale_off} stale of {reads_off} reads")
    print(f"phase lock on:  {stale_on} stale of {reads_on} reads, {shifts_on} phase shifts")
    print(
        f"RESULT stale_reads_off={stale_off} stale_reads_on={stale_on} phase_shifts_on={shifts_on} "
        f"reads_each={min(reads_off, reads_on)}"
    )


if __name__ == "__main__":
    main()
