"""Fewer counter reads: the energy between two counter reads spread over the ticks between them by instant power.

Why: an NVML energy-counter read costs ~3-4 ms of CPU (it is the driver's time, the same through the field-values
API), so 8 GPUs read at 10 Hz take ~30 % of a core, three times issue 12's budget for a node's meter. The instant
power field (``NVML_FI_DEV_POWER_INSTANT``) costs ~0.08 ms. Reading the counter every N ticks and the power every
tick, then spreading each counter delta over its ticks in proportion to power x time, keeps every second's energy
the counter's, to the millijoule, and places it within the second by power: on an H100 under a GEMM switched on and
off at random every 50-400 ms, each 100 ms interval's energy came out within 12 % (median; p90 64 %) of the
counter's own 100 ms delta, against 56 % (p90 83 %) spread evenly (``bench/gpu/nvml_read_cost.py``). The power
read at an interval's *end* describes it: NVML updates the instant power with the counter, and that reading
correlates 0.87-0.93 with the interval's energy (the one before it, 0.18-0.39).

``spread`` is the rule (pure); ``CounterSpreader`` keeps one device's ticks until the next counter read brings the
energy to spread. A counter read that fails is retried at the next tick and the ticks wait for it; one that shows a
lower value (a reset) or comes too late (``max_pending``) turns the waiting ticks into gaps: their energy is known
to nobody, as with any failed read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from meter.samples import Sample

__all__ = ["CounterSpreader", "spread"]

MAX_PENDING_TICKS = 100  # ~10 s at 10 Hz: ticks that wait longer for a counter read become gaps


def spread(last_mj: int, last_t_ns: int, ticks: Sequence[tuple[int, int | None]], new_mj: int) -> list[int]:
    """Cumulative counter values for ``ticks`` ((t_ns, power read at that tick, mW or None)), the last of which is
    the counter read of ``new_mj``; the previous counter read was ``last_mj`` at ``last_t_ns``.

    Each tick's interval (from the tick before) weighs its duration times the power read at its end; without a
    power reading for every tick, or with no power at all, the duration alone. The values never decrease, never
    pass ``new_mj``, and the last one is ``new_mj``. Needs ``new_mj >= last_mj`` and increasing stamps."""
    if not ticks:
        raise ValueError("spread needs at least the counter read's own tick")
    if new_mj < last_mj:
        raise ValueError(f"the counter went from {last_mj} to {new_mj} mJ: a reset is not spread")
    durations = []
    before = last_t_ns
    for t_ns, _ in ticks:
        if t_ns <= before:
            raise ValueError(f"tick stamps must increase: {t_ns} after {before}")
        durations.append(t_ns - before)
        before = t_ns
    powers = [p for _, p in ticks]
    weights: Sequence[float]
    if all(p is not None and p > 0 for p in powers):
        weights = [d * p for d, p in zip(durations, powers, strict=True)]  # type: ignore[operator]
    else:
        weights = durations
    total = sum(weights)
    delta = new_mj - last_mj
    out = []
    acc = 0.0
    for w in weights[:-1]:
        acc += w
        out.append(last_mj + min(delta, int(delta * acc / total)))
    out.append(new_mj)
    return out


@dataclass(slots=True)
class CounterSpreader:
    """One device's ticks between counter reads, turned into samples when the next good counter read comes."""

    device: str
    max_pending: int = MAX_PENDING_TICKS
    _last: tuple[int, int] | None = None  # (t_ns, energy_mj) of the last good counter read
    _pending: list[tuple[int, int | None]] = field(default_factory=list)  # (t_ns, power mW) waiting for a counter
    _retry: bool = False  # the last counter read failed

    @property
    def holds_ticks(self) -> bool:
        """Ticks wait for the next counter read (``settle`` them with one before stopping)."""
        return bool(self._pending)

    @property
    def owes_counter(self) -> bool:
        """The last counter read failed (or none was made): read it at the next tick, whatever the schedule."""
        return self._last is None or self._retry

    def power_tick(self, t_ns: int, power_mw: int | None) -> list[Sample]:
        """A tick without a counter read: kept until one comes (or, past ``max_pending``, given up as gaps)."""
        if self._last is None:
            return [Sample(self.device, t_ns, None, error="no counter read yet to spread this tick's energy over")]
        self._pending.append((t_ns, power_mw))
        if len(self._pending) > self.max_pending:
            return self._give_up(f"no counter read for {len(self._pending)} ticks")
        return []

    def counter_tick(self, t_ns: int, energy_mj: int | None, power_mw: int | None, error: str | None) -> list[Sample]:
        """A tick with a counter read (``energy_mj`` None: it failed, ``error`` says why)."""
        if energy_mj is None:
            if self._last is None:
                return [Sample(self.device, t_ns, None, error=error)]
            out = self.power_tick(t_ns, power_mw)
            self._retry = True
            return out
        self._retry = False
        if self._last is None:
            self._last = (t_ns, energy_mj)
            return [Sample(self.device, t_ns, energy_mj)]
        last_t, last_mj = self._last
        ticks = [*self._pending, (t_ns, power_mw)]
        self._pending = []
        self._last = (t_ns, energy_mj)
        if energy_mj < last_mj:  # a reset: what the ticks between drew is not known
            gaps = [Sample(self.device, t, None, error="counter reset between counter reads") for t, _ in ticks[:-1]]
            return [*gaps, Sample(self.device, t_ns, energy_mj)]
        values = spread(last_mj, last_t, ticks, energy_mj)
        return [Sample(self.device, t, v) for (t, _), v in zip(ticks, values, strict=True)]

    def _give_up(self, why: str) -> list[Sample]:
        gaps = [Sample(self.device, t, None, error=why) for t, _ in self._pending]
        self._pending = []
        self._last = None  # the next good read starts afresh: nothing is spread across the gaps
        return gaps
