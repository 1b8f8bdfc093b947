"""Energy of a short span from NVML's counter, polled densely on a thread and interpolated between its updates.

The counter (``nvmlDeviceGetTotalEnergyConsumption``) advances every ~100 ms, so two plain reads around a 2 s span
can be off by up to one update at each end (~5 %). Polling every 20 ms tells when each update landed (to 20 ms);
interpolating linearly between updates gives the energy at any instant, and the error shrinks to the power change
within one update. The counter trails the work by about one update, the same at both ends of a span, so it cancels
for a span of steady work. For benchmarks of an engine, not for billing (the gateway's meter does that).
"""

from __future__ import annotations

import bisect
import math
import threading
import time


class EnergyPoller:
    """Polls GPU ``index``'s energy counter every ``interval_s`` from ``start()`` to ``stop()``. Without NVML (or a
    GPU) it records nothing and every energy is NaN."""

    def __init__(self, index: int = 0, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[int, int]] = []  # (time.perf_counter_ns(), mJ)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="energy-poll", daemon=True)
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption
        except Exception:
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def start(self) -> EnergyPoller:
        if self.available:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            mj = int(self._read(self._handle))
            self.samples.append((time.perf_counter_ns(), mj))
            self._stop.wait(self.interval_s)

    def energy_j(self, start_ns: int, end_ns: int) -> float:
        """Joules between two ``time.perf_counter_ns()`` instants, NaN if the samples do not cover them."""
        return energy_between(self.samples, start_ns, end_ns)


def update_points(samples: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The samples at which the counter showed a new value (each stands for the update just before it)."""
    out = samples[:1]
    for t, e in samples[1:]:
        if e != out[-1][1]:
            out.append((t, e))
    return out


def energy_between(samples: list[tuple[int, int]], start_ns: int, end_ns: int) -> float:
    points = update_points(samples)
    if len(points) < 2 or start_ns < points[0][0] or end_ns > points[-1][0] or end_ns < start_ns:
        return math.nan
    return (_at(points, end_ns) - _at(points, start_ns)) / 1000


def _at(points: list[tuple[int, int]], t_ns: int) -> float:
    k = bisect.bisect_right([t for t, _ in points], t_ns)
    if k >= len(points):
        return float(points[-1][1])
    (t0, e0), (t1, e1) = points[k - 1], points[k]
    return e0 + (e1 - e0) * (t_ns - t0) / (t1 - t0)
