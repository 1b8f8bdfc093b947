"""The sampler: one daemon thread that reads an energy source at the counter's cadence and hands samples to a sink.

Why a thread: an NVML counter read blocks for ~3-4 ms (p99 ~17 ms), so it must never run on the asyncio loop that
serves requests. Why a fixed schedule: ticks fall at ``start + k * interval`` so the sampling grid does not drift with
read latency; a tick that is already past when the previous one finishes is skipped (counted in ``missed_ticks``)
instead of being read in a burst, because back-to-back reads of a counter that updates every ~100 ms add nothing.

Phase: NVML's counter advances in ~100 ms steps. A sampling grid whose reads land within a few milliseconds of the
counter's updates sees some updates and misses others (a read repeats the previous value, then the next one jumps two
steps), which turns into ±100 ms of timing noise in attribution. So when most devices of a read return their previous
value (the counter has not moved since the last tick: a read just before its update), the grid is shifted by half an
interval, putting reads midway between updates, where the counter's ~3 % period drift keeps them for many ticks. The
constant offset that remains is what the engine's lag (and its calibration) accounts for. ``phase_lock=False`` turns
this off (a source without stepped counters).

Nothing here hides a problem: a read that raises becomes a gap ``Sample`` for every device of the source, a counter
that goes backwards is logged, counted as a reset and still passed on (the consumer starts a new segment there), and an
exception from the sink is logged and counted. None of these stops the thread. A wall clock stepped back (NTP) would
order a device's samples against its counter; they are restamped in read order instead (``stepped_back``). So are
the first samples of a device after where an earlier process left it, when ``seed`` says (the stamp of the device's
last stored sample): a meter restarted after its host's clock stepped back would otherwise interleave its readings
with the ones it stored before, and the engine would count the energy between them twice.

Only stdlib and structlog are imported, so the module also runs on a bare GPU image (see bench/gpu/).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from meter.lifecycle import Lifecycle
from meter.samples import EnergySource, Sample, SettlingSource, in_read_order

log = structlog.get_logger(__name__)

INTERVAL_MS = 100  # NVML's energy counter advances about every 100 ms on an H100
_READ_MS_WINDOW = 4096  # read latencies kept for the percentiles (~7 minutes at 10 Hz)
_LOG_EVERY = 600  # while a failure persists, log it again every this many occurrences (~1 minute at 10 Hz)


@dataclass(frozen=True, slots=True)
class SamplerStats:
    """What the sampler has done and what it cost; a snapshot."""

    reads: int  # calls of source.read() (one per tick that ran)
    failed_reads: int  # gap samples: a device read that failed, or every device of a read() that raised
    resets: int  # samples whose counter went backwards against the previous valid one of the device
    read_ms_p50: float | None  # latency of source.read(), over the last reads
    read_ms_p99: float | None
    cpu_s: float  # CPU time of the sampler thread (time.thread_time)
    wall_s: float  # wall time since start (until stop, once stopped)
    missed_ticks: int = 0  # scheduled ticks skipped because the previous tick ran past them
    phase_shifts: int = 0  # times the grid moved half an interval away from the counter's updates
    source_errors: int = 0  # read() calls that raised
    sink_errors: int = 0  # sink calls that raised (those samples are lost to the sink)
    stepped_back: int = 0  # samples the wall clock stamped at or before their device's previous one (restamped)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of a non-empty sorted list (q in 0..100)."""
    rank = max(1, -(-len(sorted_values) * q // 100))  # ceil(n * q / 100), at least 1
    return sorted_values[int(rank) - 1]


def power_from_readings(readings: list[tuple[int, int]]) -> float | None:
    """Average power in watts between the first and last of ``(t_ns, energy_mj)`` readings of one counter segment."""
    if len(readings) < 2:
        return None
    (t0_ns, e0_mj), (t1_ns, e1_mj) = readings[0], readings[-1]
    if t1_ns <= t0_ns:
        return None
    return (e1_mj - e0_mj) * 1e6 / (t1_ns - t0_ns)  # mJ/ns = 1e6 W


class Sampler:
    """Reads ``source`` every ``interval_ms`` on a daemon thread and calls ``sink`` with each read's samples.

    ``power_w(device)`` is the average power over the last ``power_window_ms`` of valid readings (at least the last
    two). It exists for ``/metrics``: the counter moves in ~100 ms steps, so the power between two readings 100 ms
    apart jumps between ~0 and ~2x the truth; a window of about a second smooths that. Never use it for attribution.
    """

    def __init__(
        self,
        source: EnergySource,
        sink: Callable[[list[Sample]], None],
        *,
        interval_ms: int = INTERVAL_MS,
        power_window_ms: int = 1000,
        phase_lock: bool = True,
        seed: Callable[[Sequence[str]], Mapping[str, int | None]] | None = None,
    ) -> None:
        """``seed``, if given, is asked on the sampler's thread, once for the devices first seen in a read (a
        simulator's device is named by its first answer), for the stamp of each one's last sample already stored
        (None: none). A seed that raises is logged; those devices then go unseeded."""
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms}")
        self._source = source
        self._sink = sink
        self._interval_ns = interval_ms * 1_000_000
        self._power_window_ns = power_window_ms * 1_000_000
        self._phase_lock = phase_lock
        self._seed = seed
        self._seeded: set[str] = set()  # devices the seed was asked for (the sampler's thread only)
        self._phase_shifts = 0
        self._stale_in_tick = 0  # devices whose valid reading repeated the previous value, in the current tick
        self._valid_in_tick = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = Lifecycle.NEW
        self._lock = threading.Lock()  # guards everything below, read by other threads
        self._reads = 0
        self._failed_reads = 0
        self._resets = 0
        self._missed_ticks = 0
        self._source_errors = 0
        self._sink_errors = 0
        self._read_ms: deque[float] = deque(maxlen=_READ_MS_WINDOW)
        self._cpu_s = 0.0
        self._started_ns: int | None = None
        self._stopped_ns: int | None = None
        self._last_valid: dict[str, tuple[int, int]] = {}  # device -> (t_ns, energy_mj)
        self._last_t: dict[str, int] = {}  # device -> t_ns of its last sample (valid or not)
        self._stepping = False  # the last sample was restamped: the wall clock is behind the samples'
        self._stepped_back = 0
        self._power_readings: dict[str, deque[tuple[int, int]]] = {}
        self._failing_devices: dict[str, int] = {}  # device -> consecutive gaps

    # ---- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread; the first read happens at once."""
        if self._state is not Lifecycle.NEW:
            raise RuntimeError(f"Sampler.start() on a sampler that is {self._state.value}")
        self._started_ns = time.monotonic_ns()
        self._thread = threading.Thread(target=self._run, name="joulegate-sampler", daemon=True)
        self._state = Lifecycle.RUNNING
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Ask the thread to stop and wait up to ``timeout_s``; True when it has ended. Does not close the source."""
        self._stop.set()
        thread, self._state = self._thread, Lifecycle.CLOSED
        if thread is None:
            return True
        thread.join(timeout_s)
        stopped = not thread.is_alive()
        if not stopped:
            log.warning("sampler_stop_timeout", timeout_s=timeout_s)
        return stopped

    @property
    def state(self) -> Lifecycle:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is Lifecycle.RUNNING and self._thread is not None and self._thread.is_alive()

    # ---- readouts --------------------------------------------------------------------------------------------------

    @property
    def stats(self) -> SamplerStats:
        with self._lock:
            read_ms = sorted(self._read_ms)
            end_ns = self._stopped_ns if self._stopped_ns is not None else time.monotonic_ns()
            wall_s = 0.0 if self._started_ns is None else (end_ns - self._started_ns) / 1e9
            return SamplerStats(
                reads=self._reads,
                failed_reads=self._failed_reads,
                resets=self._resets,
                read_ms_p50=_percentile(read_ms, 50) if read_ms else None,
                read_ms_p99=_percentile(read_ms, 99) if read_ms else None,
                cpu_s=self._cpu_s,
                wall_s=wall_s,
                missed_ticks=self._missed_ticks,
                phase_shifts=self._phase_shifts,
                source_errors=self._source_errors,
                sink_errors=self._sink_errors,
                stepped_back=self._stepped_back,
            )

    def power_w(self, device: str) -> float | None:
        """Latest average power of ``device`` in watts, or None before two valid readings since start or a reset."""
        with self._lock:
            readings = self._power_readings.get(device)
            return power_from_readings(list(readings)) if readings else None

    # ---- the thread ------------------------------------------------------------------------------------------------

    def _run(self) -> None:
        assert self._started_ns is not None
        cpu0_s = time.thread_time()
        start_ns = self._started_ns
        tick = 0
        try:
            while not self._stop.is_set():
                stale = self._tick()
                with self._lock:
                    self._cpu_s = time.thread_time() - cpu0_s
                    if stale and self._phase_lock:
                        self._phase_shifts += 1
                        start_ns += self._interval_ns // 2  # read midway between the counter's updates
                tick += 1
                now_ns = time.monotonic_ns()
                due_ns = start_ns + tick * self._interval_ns
                if now_ns >= due_ns:  # ran past one or more ticks: skip them, do not burst
                    next_tick = (now_ns - start_ns) // self._interval_ns + 1
                    with self._lock:
                        self._missed_ticks += next_tick - tick
                    tick = next_tick
                    due_ns = start_ns + tick * self._interval_ns
                self._stop.wait((due_ns - now_ns) / 1e9)
            if isinstance(self._source, SettlingSource):
                self._settle(self._source)
        finally:
            with self._lock:
                self._cpu_s = time.thread_time() - cpu0_s
                self._stopped_ns = time.monotonic_ns()

    def _seed_stamps(self, samples: list[Sample]) -> None:
        """Where earlier processes left the devices first seen in ``samples`` (on the sampler's thread, lock free)."""
        if self._seed is None:
            return
        new = sorted({sample.device for sample in samples} - self._seeded)
        if not new:
            return
        self._seeded.update(new)
        try:
            stamps = self._seed(new)
        except Exception as exc:  # e.g. the database away at start: this process's own order still holds
            log.warning("sampler_not_seeded", devices=new, error=f"{type(exc).__name__}: {exc}")
            return
        with self._lock:
            for device in new:
                t_ns = stamps.get(device)
                if t_ns is not None:
                    self._last_t[device] = max(t_ns, self._last_t.get(device, t_ns))

    def _tick(self) -> bool:
        """One read of the source; True when most devices repeated their previous value (read just before an update)."""
        t0_ns = time.perf_counter_ns()
        try:
            samples = list(self._source.read())
        except Exception as e:
            now_ns = time.time_ns()
            error = f"source raised {type(e).__name__}: {e}"
            samples = [Sample(device=d, t_ns=now_ns, energy_mj=None, error=error) for d in self._source.devices]
            with self._lock:
                self._source_errors += 1
                n = self._source_errors
            if n == 1 or n % _LOG_EVERY == 0:
                log.exception("sampler_source_raised", source_errors=n)
        read_ms = (time.perf_counter_ns() - t0_ns) / 1e6
        with self._lock:
            self._reads += 1
            self._read_ms.append(read_ms)
        return self._deliver(samples)

    def _deliver(self, samples: list[Sample]) -> bool:
        """Order, account and hand one read's samples to the sink; True when most devices repeated their value."""
        self._seed_stamps(samples)
        with self._lock:
            self._stale_in_tick = self._valid_in_tick = 0
            samples = [self._in_order(sample) for sample in samples]
            for sample in samples:
                self._account(sample)
            stale = self._valid_in_tick > 0 and 2 * self._stale_in_tick > self._valid_in_tick
        try:
            self._sink(samples)
        except Exception:
            with self._lock:
                self._sink_errors += 1
                n = self._sink_errors
            if n == 1 or n % _LOG_EVERY == 0:
                log.exception("sampler_sink_raised", sink_errors=n, samples_lost=len(samples))
        return stale

    def _settle(self, source: SettlingSource) -> None:
        """At stop: the readings the source still holds back, delivered like a tick's."""
        try:
            samples = source.settle()
        except Exception:
            log.exception("sampler_settle_failed")
            return
        if samples:
            self._deliver(samples)

    def _in_order(self, sample: Sample) -> Sample:
        """``in_read_order`` against the device's previous sample, counted and logged once per step (lock held)."""
        last = self._last_t.get(sample.device)
        ordered = in_read_order(sample, last)
        if last is None or ordered is sample:
            self._stepping = False
        else:
            if not self._stepping:
                log.warning("sampler_clock_stepped_back", device=sample.device, back_ms=(last - sample.t_ns) / 1e6)
            self._stepping = True
            self._stepped_back += 1
        self._last_t[sample.device] = ordered.t_ns
        return ordered

    def _account(self, sample: Sample) -> None:
        """Update counters, reset detection and the power window with one sample (lock held)."""
        device = sample.device
        if sample.energy_mj is None:
            self._failed_reads += 1
            gaps = self._failing_devices.get(device, 0) + 1
            self._failing_devices[device] = gaps
            if gaps == 1 or gaps % _LOG_EVERY == 0:
                log.warning("energy_read_failed", device=device, error=sample.error, consecutive=gaps)
            return
        gaps = self._failing_devices.pop(device, 0)
        if gaps:
            log.info("energy_read_recovered", device=device, gaps=gaps)
        previous = self._last_valid.get(device)
        self._valid_in_tick += 1
        if previous is not None and sample.energy_mj == previous[1]:
            self._stale_in_tick += 1
        readings = self._power_readings.setdefault(device, deque())
        if previous is not None and sample.energy_mj < previous[1]:
            self._resets += 1
            log.warning("energy_counter_reset", device=device, previous_mj=previous[1], energy_mj=sample.energy_mj)
            readings.clear()  # power across a reset is meaningless
        self._last_valid[device] = (sample.t_ns, sample.energy_mj)
        readings.append((sample.t_ns, sample.energy_mj))
        while len(readings) > 2 and readings[-1][0] - readings[1][0] >= self._power_window_ns:
            readings.popleft()
