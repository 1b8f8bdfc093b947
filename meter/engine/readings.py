"""From raw device samples to the counter readings of one backend epoch: ticks, gaps, segments. Pure; no I/O.

A backend's counter is the sum of its devices' counters (tensor parallelism spans several GPUs). The sampler reads
every device once per tick, a few ms apart, so one tick's samples are grouped back together here (``group_ticks``):
samples whose times follow each other closely (``gap_ns``) and that name each device at most once form one tick,
stamped with its last sample's time. A tick is *good* when it has a valid reading of every device of the backend.

An *interval* between consecutive ticks is measured when both ticks are good, no device's counter went backwards
(a reset), and it is not longer than ``max_interval_ns`` (a sampler that was down for minutes measured the energy but
not when it was spent). Anything else is a *gap*: its energy is never attributed, and the readings are split into
segments there, each attributed on its own.

Epochs partition the history. A reading's *work time* is its time minus the counter lag. An interval belongs to the
epoch in which its first tick's work time lies; an epoch [start, end) therefore uses its ticks with work time in
[start, end) plus the first tick at or after ``end`` (the *boundary*, shared with the next epoch). Summed over epochs,
the measured energy is exactly the counter's over the whole history, less the gaps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from meter.attribution import CounterReading, drop_stale_readings

__all__ = ["EpochReadings", "RawSample", "Tick", "epoch_bounds", "epoch_readings", "group_ticks"]

RawSample = tuple[str, int, int | None]  # (device, t_ns, energy_mj or None for a failed read)


@dataclass(frozen=True, slots=True)
class Tick:
    """One sampler tick of one backend. ``energies_mj`` per device in the backend's device order; None: bad tick."""

    t_ns: int
    energies_mj: tuple[int, ...] | None

    @property
    def good(self) -> bool:
        return self.energies_mj is not None

    @property
    def energy_mj(self) -> int:
        assert self.energies_mj is not None
        return sum(self.energies_mj)


@dataclass(frozen=True, slots=True)
class EpochReadings:
    """The measured part of one epoch: segments of readings (each >= 2, strictly increasing times, counters that do
    not decrease), their energy, and what was not measured."""

    segments: tuple[tuple[CounterReading, ...], ...]
    counter_mj: int  # sum over segments of last - first: the energy this epoch owns
    gaps: int  # bad ticks (failed or incomplete reads), counter resets and over-long intervals in the epoch
    samples: int  # good readings used
    first_reading_ns: int | None  # t_ns of the first good reading used
    last_reading_ns: int | None  # t_ns of the last good reading used (the boundary, when the last interval is good)
    boundary_ns: int  # t_ns of the boundary tick (first with work time >= end)


def epoch_bounds(t_ns: int, epoch_ns: int) -> tuple[int, int]:
    """The epoch [start, end) that holds ``t_ns``; boundaries are multiples of ``epoch_ns`` since the Unix epoch."""
    start = t_ns - t_ns % epoch_ns
    return start, start + epoch_ns


def group_ticks(samples: Sequence[RawSample], devices: Sequence[str], gap_ns: int) -> list[Tick]:
    """Group samples (sorted by time) into ticks of ``devices``; samples of other devices are ignored.

    A new tick starts at a sample more than ``gap_ns`` after the previous one, or one whose device the current tick
    already holds. The grouping of a run of samples does not depend on where the run starts once it has passed one
    pause longer than ``gap_ns``, so callers that look back by a second group every tick the same way every time.
    Tick times strictly increase: a tick not later than the one before it is dropped as bad data.
    """
    index = {d: i for i, d in enumerate(devices)}
    n = len(devices)
    ticks: list[Tick] = []
    if n == 1:  # the common case: one GPU per backend, one sample per tick
        (only,) = devices
        last_t: int | None = None
        for device, t_ns, energy in samples:
            if device != only or (last_t is not None and t_ns <= last_t):
                continue
            ticks.append(Tick(t_ns, None if energy is None else (energy,)))
            last_t = t_ns
        return ticks

    current: list[int | None] = []
    seen: set[int] = set()
    bad = False
    last_t = None

    def close() -> None:
        if not seen or last_t is None:
            return
        complete = not bad and len(seen) == n
        tick = Tick(last_t, tuple(current) if complete else None)  # type: ignore[arg-type]
        if not ticks or tick.t_ns > ticks[-1].t_ns:
            ticks.append(tick)

    for device, t_ns, energy in samples:
        i = index.get(device)
        if i is None:
            continue
        if seen and (i in seen or (last_t is not None and t_ns - last_t > gap_ns)):
            close()
            current, seen, bad = [], set(), False
        if not seen:
            current = [None] * n
        seen.add(i)
        current[i] = energy
        bad = bad or energy is None
        last_t = t_ns
    close()
    return ticks


def epoch_readings(
    ticks: Sequence[Tick],
    start_ns: int,
    end_ns: int,
    lag_ns: int,
    max_interval_ns: int,
    *,
    drop_stale: bool = True,
) -> EpochReadings | None:
    """The readings of epoch [start_ns, end_ns) (work time), or None while no tick has work time >= ``end_ns``.

    ``ticks`` must hold every tick with work time >= ``start_ns`` up to the boundary (earlier ones are ignored).
    ``drop_stale`` applies ``drop_stale_readings`` to each segment (NVML's counter repeats its value when read twice
    between two updates); the energy of a segment is unchanged by it.
    """
    lo = start_ns + lag_ns
    hi = end_ns + lag_ns
    first = next((i for i, t in enumerate(ticks) if t.t_ns >= lo), None)
    if first is None:
        return None
    boundary = next((i for i in range(first, len(ticks)) if ticks[i].t_ns >= hi), None)
    if boundary is None:
        return None

    segments: list[tuple[CounterReading, ...]] = []
    run: list[CounterReading] = []
    gaps = 0
    counter_mj = 0

    def flush() -> None:
        nonlocal run
        if len(run) >= 2:
            kept = drop_stale_readings(run) if drop_stale else run
            if len(kept) >= 2:
                segments.append(tuple(kept))
        run = []

    for j in range(first, boundary):
        a, b = ticks[j], ticks[j + 1]
        if a.energies_mj is None:
            gaps += 1  # a failed or incomplete read in this epoch
            flush()
            continue
        if b.energies_mj is None:
            flush()  # counted as a gap by the epoch that holds b
            continue
        if any(eb < ea for ea, eb in zip(a.energies_mj, b.energies_mj, strict=True)):
            gaps += 1  # a counter reset: the interval across it is unmeasured
            flush()
            continue
        if b.t_ns - a.t_ns > max_interval_ns:
            gaps += 1  # the sampler was away: energy known, but not when it was spent
            flush()
            continue
        if not run:
            run.append(CounterReading(a.t_ns, a.energy_mj))
        run.append(CounterReading(b.t_ns, b.energy_mj))
        counter_mj += b.energy_mj - a.energy_mj
    flush()

    used = [r for seg in segments for r in seg]
    return EpochReadings(
        segments=tuple(segments),
        counter_mj=counter_mj,
        gaps=gaps,
        samples=len({r.t_ns for r in used}),
        first_reading_ns=segments[0][0].t_ns if segments else None,
        last_reading_ns=segments[-1][-1].t_ns if segments else None,
        boundary_ns=ticks[boundary].t_ns,
    )
