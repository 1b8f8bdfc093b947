"""Energy counter readings and the protocol every energy source implements.

A source reads cumulative energy counters (millijoules since some origin, like NVML's
``nvmlDeviceGetTotalEnergyConsumption``). It is read on the sampler's own thread, never on the request path: an
NVML read costs ~3-4 ms. Each read yields one ``Sample`` per device. A failed read is a ``Sample`` with
``energy_mj=None`` (a gap); a counter that went backwards is kept as read and flagged by the consumer as a reset.
Neither is ever papered over: the interval that spans one has unmeasured energy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


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
