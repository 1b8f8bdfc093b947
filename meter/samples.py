"""Energy counter readings and the protocol every energy source implements.

A source reads cumulative energy counters (millijoules since some origin, like NVML's
``nvmlDeviceGetTotalEnergyConsumption``). It is read on the sampler's own thread, never on the request path: an
NVML read costs ~3-4 ms. Each read yields one ``Sample`` per device. A failed read is a ``Sample`` with
``energy_mj=None`` (a gap); a counter that went backwards is kept as read and flagged by the consumer as a reset.
Neither is ever papered over: the interval that spans one has unmeasured energy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

MAX_RESTAMP_NS = 1_000_000_000  # a clock further behind a device's last sample makes gaps, not restamped readings


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of one device's cumulative energy counter."""

    device: str  # stable name, e.g. "nvml:GPU-5f3c..." (by UUID) or "sim:http://127.0.0.1:3000"
    t_ns: int  # wall clock (time.time_ns()) taken just after the read returned
    energy_mj: int | None  # cumulative counter; None when the read failed
    error: str | None = None  # why the read failed


@runtime_checkable
class EnergySource(Protocol):
    """Something that can read cumulative energy counters of a fixed set of devices."""

    @property
    def devices(self) -> tuple[str, ...]:
        """Names of the devices this source reads, in a stable order."""
        ...

    def read(self) -> list[Sample]:
        """Read every device once. Blocking; called from the sampler thread. Never raises for a failed read."""
        ...

    def close(self) -> None:
        """Release the underlying handle (NVML shutdown, HTTP session)."""
        ...


@runtime_checkable
class SettlingSource(EnergySource, Protocol):
    """A source that holds readings back until a later read completes them (``NvmlSource`` with ``counter_every``
    > 1 spreads each counter delta over the reads before it): the sampler asks it once more as it stops."""

    def settle(self) -> list[Sample]:
        """Complete and return the readings held back (a last counter read). Blocking; never raises for a read."""
        ...


def in_read_order(sample: Sample, last_t_ns: int | None) -> Sample:
    """``sample`` as it must be stored after a sample of its device stamped ``last_t_ns``: unchanged if its own time
    is later, else restamped 1 ns after it — a reading still, while the clock is at most ``MAX_RESTAMP_NS`` behind;
    a gap (energy known, not when it was spent) further behind.

    Why: the engine orders a device's readings by their stamps and counts every rise between neighbours. A wall clock
    stepped back (NTP correcting the host) would interleave later, higher counter values with earlier ones and count
    the energy between them again. In read order the counter only rises, so the total stays the counter's; within a
    second behind, the energy read meanwhile lands at the step, 1 ns apart, and further behind it goes to nobody
    rather than all onto one instant.
    """
    if last_t_ns is None or sample.t_ns > last_t_ns:
        return sample
    behind_ns = last_t_ns - sample.t_ns
    if behind_ns > MAX_RESTAMP_NS and sample.energy_mj is not None:
        error = f"the wall clock is {behind_ns / 1e6:.0f} ms behind this device's last sample"
        return replace(sample, t_ns=last_t_ns + 1, energy_mj=None, error=error)
    return replace(sample, t_ns=last_t_ns + 1)
