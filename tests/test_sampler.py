"""The sampler thread: cadence on a fixed grid, skipped ticks, gaps, resets, power, stats, stop.

The source here is a small deterministic class implementing ``EnergySource``: this machine has no GPU, and the
simulated source has its own tests (tests/test_sources.py). Timing bounds are loose because the CI box is shared.
"""

from __future__ import annotations

import itertools
import statistics
import threading
import time
from collections.abc import Callable

import pytest
import structlog.testing

from meter.sampler import Sampler, SamplerStats, _percentile, power_from_readings
from meter.samples import EnergySource, Sample
from tests.waiting import wait_until


class ScriptedSource:
    """Reads a function of the call number: an int (counter in mJ), None (gap), or an exception (raised)."""

    def __init__(self, script: Callable[[int], int | Exception | None], *, read_s: float = 0.0, device: str = "fake:0"):
        self._script = script
        self._read_s = read_s
        self._device = device
        self.calls = 0
        self.closed = False

    @property
    def devices(self) -> tuple[str, ...]:
        return (self._device,)

    def read(self) -> list[Sample]:
        n = self.calls
        self.calls += 1
        if self._read_s:
            time.sleep(self._read_s)
        value = self._script(n)
        if isinstance(value, Exception):
            raise value
        if value is None:
            return [Sample(self._device, time.time_ns(), None, error="scripted gap")]
        return [Sample(self._device, time.time_ns(), value)]

    def close(self) -> None:
        self.closed = True


class Collector:
    def __init__(self) -> None:
        self.batches: list[list[Sample]] = []
        self.lock = threading.Lock()

    def __call__(self, samples: list[Sample]) -> None:
        with self.lock:
            self.batches.append(samples)

    @property
    def samples(self) -> list[Sample]:
        with self.lock:
            return [s for batch in self.batches for s in batch]


def run_for(sampler: Sampler, seconds: float) -> SamplerStats:
    sampler.start()
    time.sleep(seconds)
    assert sampler.stop(2.0)
    return sampler.stats


def test_fake_source_implements_the_protocol() -> None:
    assert isinstance(ScriptedSource(lambda n: n), EnergySource)


def test_reads_on_a_fixed_grid_at_the_interval() -> None:
    sink = Collector()
    stats = run_for(Sampler(ScriptedSource(lambda n: 1000 * n), sink, interval_ms=20), 0.6)
    times = [s.t_ns for s in sink.samples]
    assert 24 <= len(times) <= 32, len(times)  # ~0.6 s / 20 ms + the read at t=0
    gaps_ms = [(b - a) / 1e6 for a, b in itertools.pairwise(times)]
    assert 18 <= statistics.median(gaps_ms) <= 22
    # a fixed grid, not "sleep interval after each read": the k-th read lands near start + k*interval
    drift_ms = (times[-1] - times[0]) / 1e6 - 20 * (len(times) - 1) - 20 * stats.missed_ticks
    assert abs(drift_ms) < 15, drift_ms
    assert stats.reads == len(times) and stats.failed_reads == 0 and stats.resets == 0
    assert [s.energy_mj for s in sink.samples] == [1000 * n for n in range(len(times))]


def test_slow_reads_skip_missed_ticks_instead_of_bursting() -> None:
    sink = Collector()
    stats = run_for(Sampler(ScriptedSource(lambda n: n, read_s=0.05), sink, interval_ms=20), 0.65)
    times = [s.t_ns for s in sink.samples]
    gaps_ms = [(b - a) / 1e6 for a, b in itertools.pairwise(times)]
    # each 50 ms read runs past two 20 ms ticks, so reads start every 60 ms (3 ticks), never back to back
    assert min(gaps_ms) >= 49, gaps_ms
    assert 55 <= statistics.median(gaps_ms) <= 66, gaps_ms
    assert stats.missed_ticks >= 2 * (stats.reads - 1) - 2
    assert stats.read_ms_p50 is not None and stats.read_ms_p50 >= 50


def test_failed_reads_become_gaps_and_the_thread_survives() -> None:
    def script(n: int) -> int | Exception | None:
        if n in (2, 3):
            return None
        if n == 5:
            return RuntimeError("driver hiccup")
        return 100 * n

    sink = Collector()
    sampler = Sampler(ScriptedSource(script), sink, interval_ms=10)
    stats = run_for(sampler, 0.2)
    samples = sink.samples
    assert stats.reads >= 8
    assert [s.energy_mj for s in samples[:7]] == [0, 100, None, None, 400, None, 600]
    assert samples[5].error is not None and "RuntimeError: driver hiccup" in samples[5].error
    assert samples[5].device == "fake:0"
    assert stats.failed_reads == 3 and stats.source_errors == 1 and stats.resets == 0


def test_sink_exceptions_are_counted_and_do_not_stop_sampling() -> None:
    seen: list[int] = []

    def sink(samples: list[Sample]) -> None:
        seen.append(len(seen))
        if len(seen) % 2:
            raise ValueError("ledger full")

    stats = run_for(Sampler(ScriptedSource(lambda n: n), sink, interval_ms=10), 0.15)
    assert len(seen) == stats.reads >= 8
    assert stats.sink_errors == (len(seen) + 1) // 2


def test_counter_reset_is_counted_passed_on_and_restarts_power() -> None:
    values = [5000, 6000, 7000, 100, 1100, 2100]

    def script(n: int) -> int | Exception | None:
        return values[n] if n < len(values) else values[-1] + 1000 * (n - len(values) + 1)

    sink = Collector()
    sampler = Sampler(ScriptedSource(script), sink, interval_ms=10)
    stats = run_for(sampler, 0.15)
    assert [s.energy_mj for s in sink.samples[:6]] == values  # the reset sample is passed on as read
    assert stats.resets == 1
    power = sampler.power_w("fake:0")
    # 1000 mJ per ~10 ms is ~100 W; had the reset (-6900 mJ) been inside the window it would be negative
    assert power is not None and 50 < power < 150, power


def test_power_w_tracks_a_steady_load() -> None:
    t0_ns = time.time_ns()
    # a 300 W load: the counter (mJ) is the elapsed time times the power
    source = ScriptedSource(lambda n: (time.time_ns() - t0_ns) * 300 // 1_000_000)
    sampler = Sampler(source, Collector(), interval_ms=10, power_window_ms=100)
    assert sampler.power_w("fake:0") is None
    run_for(sampler, 0.3)
    power = sampler.power_w("fake:0")
    assert power is not None and power == pytest.approx(300, rel=0.05)
    assert sampler.power_w("other:0") is None


def test_power_w_smooths_a_quantised_counter_over_its_window() -> None:
    t0_ns = time.time_ns()
    # a 500 W load seen through a counter that advances in 100 ms steps, like NVML's
    step_ns = 100_000_000
    source = ScriptedSource(lambda n: ((time.time_ns() - t0_ns) // step_ns) * step_ns * 500 // 1_000_000)
    sampler = Sampler(source, Collector(), interval_ms=20, power_window_ms=1000)
    run_for(sampler, 1.3)
    power = sampler.power_w("fake:0")
    # over >= 1 s, one 100 ms step of error is at most ~10 %
    assert power is not None and power == pytest.approx(500, rel=0.12), power


def test_power_from_readings() -> None:
    assert power_from_readings([]) is None
    assert power_from_readings([(0, 0)]) is None
    assert power_from_readings([(10, 5), (10, 9)]) is None
    assert power_from_readings([(0, 0), (500_000_000, 1), (1_000_000_000, 700_000)]) == pytest.approx(700.0)


def test_percentile_nearest_rank() -> None:
    values = sorted(float(v) for v in range(1, 101))
    assert _percentile(values, 50) == 50.0
    assert _percentile(values, 99) == 99.0
    assert _percentile([7.0], 99) == 7.0
    assert _percentile([1.0, 2.0], 50) == 1.0


def test_stats_measure_the_thread_cpu_and_wall_time() -> None:
    def busy_read(n: int) -> int:
        end = time.thread_time() + 0.004  # 4 ms of CPU on the sampler thread per read
        while time.thread_time() < end:
            pass
        return n

    sampler = Sampler(ScriptedSource(busy_read), Collector(), interval_ms=20)
    assert sampler.stats.reads == 0 and sampler.stats.read_ms_p50 is None and sampler.stats.wall_s == 0.0
    stats = run_for(sampler, 0.5)
    assert stats.wall_s == pytest.approx(0.5, abs=0.15)
    assert stats.cpu_s >= 0.004 * stats.reads * 0.9
    assert stats.cpu_s < stats.wall_s
    assert stats.read_ms_p50 is not None and stats.read_ms_p99 is not None
    assert 4 <= stats.read_ms_p50 <= stats.read_ms_p99
    assert sampler.stats.wall_s == stats.wall_s  # frozen once stopped


def test_stop_is_prompt_even_with_a_long_interval_and_does_not_close_the_source() -> None:
    source = ScriptedSource(lambda n: n)
    sampler = Sampler(source, Collector(), interval_ms=10_000)
    sampler.start()
    wait_until(lambda: source.calls >= 1, 5.0, what="the first read")  # now it sleeps out its 10 s interval
    assert sampler.running
    t0 = time.monotonic()
    assert sampler.stop(2.0)
    assert time.monotonic() - t0 < 0.5
    assert not sampler.running
    assert source.calls == 1 and not source.closed


def test_lifecycle_errors() -> None:
    sampler = Sampler(ScriptedSource(lambda n: n), Collector(), interval_ms=10)
    assert sampler.stop(0.1)  # stopping a sampler that never started is harmless
    with pytest.raises(ValueError):
        Sampler(ScriptedSource(lambda n: n), Collector(), interval_ms=0)
    other = Sampler(ScriptedSource(lambda n: n), Collector(), interval_ms=10)
    other.start()
    try:
        with pytest.raises(RuntimeError):
            other.start()
    finally:
        assert other.stop(2.0)


class SteppedCounter:
    """A counter that advances every ``period_s`` (like NVML's), its updates on the sampler's own grid.

    Each read sees the counter at its call time plus a jitter that alternates ±``jitter_s``: reads that land on
    the update instants then see some updates and miss others, which is the case the phase lock exists for.
    """

    def __init__(self, period_s: float, jitter_s: float) -> None:
        self.period_s = period_s
        self.jitter_s = jitter_s
        self.t0: float | None = None
        self.calls = 0

    @property
    def devices(self) -> tuple[str, ...]:
        return ("fake:stepped",)

    def read(self) -> list[Sample]:
        now = time.monotonic()
        if self.t0 is None:
            self.t0 = now  # updates fall on the grid the sampler started on
        seen = now + (self.jitter_s if self.calls % 2 else -self.jitter_s)
        self.calls += 1
        steps = int((seen - self.t0) // self.period_s)
        return [Sample("fake:stepped", time.time_ns(), 10_000 + 100 * steps)]

    def close(self) -> None:
        pass


def _stale_reads(samples: list[Sample]) -> int:
    values = [s.energy_mj for s in samples]
    return sum(1 for a, b in itertools.pairwise(values) if a == b)


@pytest.mark.parametrize("phase_lock", [True, False])
def test_phase_lock_moves_reads_away_from_the_counter_updates(phase_lock: bool) -> None:
    sink = Collector()
    sampler = Sampler(SteppedCounter(0.05, 0.01), sink, interval_ms=50, phase_lock=phase_lock)
    stats = run_for(sampler, 1.6)
    samples = sink.samples
    assert len(samples) >= 20
    if phase_lock:
        assert 1 <= stats.phase_shifts <= 2
        # once shifted, reads sit midway between updates: every read sees exactly one new step
        after = samples[stats.phase_shifts * 2 + 2 :]
        assert _stale_reads(after) == 0
        assert all(b.energy_mj - a.energy_mj == 100 for a, b in itertools.pairwise(after))
    else:
        assert stats.phase_shifts == 0
        assert _stale_reads(samples) >= 5  # without it, reads keep straddling the updates


class SteppedClockSource:
    """A counter rising 100 mJ a read, stamped by a wall clock that runs 100 ms a read and steps back 250 ms after
    the third read (NTP correcting the host)."""

    def __init__(self) -> None:
        self.calls = 0

    @property
    def devices(self) -> tuple[str, ...]:
        return ("fake:0",)

    def read(self) -> list[Sample]:
        n = self.calls
        self.calls += 1
        t_ms = 1_000 + 100 * n - (250 if n >= 3 else 0)
        return [Sample("fake:0", t_ms * 1_000_000, 10_000 + 100 * n)]

    def close(self) -> None:
        pass


def test_a_clock_stepped_back_never_orders_samples_against_the_counter() -> None:
    """The engine sorts readings by time and counts every rise between neighbours: stamped as the clock read them,
    t = 1000, 1100, 1200, [step] 1050, 1150, 1250 ... with the counter at 10000, 10100, 10200, 10300, ... sort into
    10000, 10300, 10100, 10400, 10200 ...: rises of 300 + 300 + ... where the counter rose 100 a read, the same
    energy counted again. Restamped in read order, time order is read order and the rises sum to the counter's."""
    sink = Collector()
    sampler = Sampler(SteppedClockSource(), sink, interval_ms=5, phase_lock=False)
    with structlog.testing.capture_logs() as logs:
        sampler.start()
        wait_until(lambda: len(sink.samples) >= 10, 5.0)
        assert sampler.stop(2.0)
    samples = sink.samples
    by_time = sorted(samples, key=lambda s: s.t_ns)
    assert [s.energy_mj for s in by_time] == [s.energy_mj for s in samples]  # time order is read order
    assert len({s.t_ns for s in samples}) == len(samples)  # (device, t_ns) stays a key: none dropped as a duplicate
    rises = sum(max(0, b.energy_mj - a.energy_mj) for a, b in itertools.pairwise(by_time))  # type: ignore[operator]
    assert rises == samples[-1].energy_mj - samples[0].energy_mj  # type: ignore[operator]
    # the reads stamped at or before 1200 ms (1050, 1150) went right after it; 1250 is past it and keeps its time
    assert [s.t_ns // 1_000_000 for s in samples[:7]] == [1000, 1100, 1200, 1200, 1200, 1250, 1350]
    assert [s.t_ns for s in samples[3:5]] == [1_200_000_001, 1_200_000_002]
    assert sampler.stats.stepped_back == 2
    assert [e["back_ms"] for e in logs if e["event"] == "sampler_clock_stepped_back"] == [150.0]  # once a step


class FarSteppedClockSource(SteppedClockSource):
    """The same counter; the clock steps back 1,650 ms after the third read (it passes the last stamp 16 reads on)."""

    def read(self) -> list[Sample]:
        n = self.calls
        self.calls += 1
        t_ms = 1_000 + 100 * n - (1_650 if n >= 3 else 0)
        return [Sample("fake:0", t_ms * 1_000_000, 10_000 + 100 * n)]


def test_a_clock_stepped_far_back_makes_gaps_until_it_catches_up() -> None:
    """Beyond a second behind, restamping would put seconds of energy on one instant (and on whoever ran then):
    those reads become gaps, attributed to nobody, and readings resume once the clock passes the last stamp."""
    sink = Collector()
    sampler = Sampler(FarSteppedClockSource(), sink, interval_ms=5, phase_lock=False)
    sampler.start()
    wait_until(lambda: len(sink.samples) >= 22, 5.0)
    assert sampler.stop(2.0)
    samples = sink.samples
    assert all(a.t_ns < b.t_ns for a, b in itertools.pairwise(samples))  # in read order
    stamped_ms = [s.t_ns / 1e6 for s in samples]
    kinds = ["ok" if s.energy_mj is not None else "gap" for s in samples]
    # reads 3..18 stamp -350..1150 ms against the last, 1200: more than 1 s behind (3..8) gaps, then restamped
    assert kinds[:3] == ["ok"] * 3 and kinds[3:9] == ["gap"] * 6 and kinds[9:20] == ["ok"] * 11
    assert all("ms behind this device's last sample" in (s.error or "") for s in samples[3:9])
    assert round(stamped_ms[18], 6) == 1200.000016 and stamped_ms[19] == 1250  # caught up: its own time again
    assert sampler.stats.stepped_back == 16


class RestartedClockSource(SteppedClockSource):
    """The same counter, read by a process that started after its predecessor stored samples up to 1,200 ms: its
    clock was stepped back meanwhile, so its reads stamp 950, 1050, 1150, 1250 ... ms."""

    def read(self) -> list[Sample]:
        n = self.calls
        self.calls += 1
        return [Sample("fake:0", (950 + 100 * n) * 1_000_000, 10_300 + 100 * n)]


def test_a_restarted_sampler_goes_after_what_its_predecessor_stored() -> None:
    """Unseeded, the new process's 950, 1050, 1150 interleave with the stored 1000, 1100, 1200 and the engine counts
    the counter's rise between them twice; seeded with the device's last stored stamp (asked once, for the devices
    of the first read), they go right after it."""
    asked: list[list[str]] = []

    def seed(devices: list[str]) -> dict[str, int | None]:
        asked.append(list(devices))
        return {"fake:0": 1_200_000_000, "fake:other": None}

    sink = Collector()
    sampler = Sampler(RestartedClockSource(), sink, interval_ms=5, phase_lock=False, seed=seed)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        sampler.start()
        wait_until(lambda: len(sink.samples) >= 5, 5.0)
        assert sampler.stop(2.0)
    stamps = [s.t_ns for s in sink.samples]
    assert stamps[:4] == [1_200_000_001, 1_200_000_002, 1_200_000_003, 1_250_000_000]
    assert asked == [["fake:0"]]
    assert sampler.stats.stepped_back == 3
    assert [e["back_ms"] for e in logs if e["event"] == "sampler_clock_stepped_back"] == [250.0]


def test_a_seed_that_fails_leaves_the_sampler_running_unseeded() -> None:
    def seed(devices: list[str]) -> dict[str, int | None]:
        raise ConnectionRefusedError("database away")

    sink = Collector()
    sampler = Sampler(RestartedClockSource(), sink, interval_ms=5, phase_lock=False, seed=seed)  # type: ignore[arg-type]
    with structlog.testing.capture_logs() as logs:
        sampler.start()
        wait_until(lambda: len(sink.samples) >= 3, 5.0)
        assert sampler.stop(2.0)
    assert [s.t_ns // 1_000_000 for s in sink.samples[:3]] == [950, 1050, 1150]  # as read: nothing to go after
    [warning] = [e for e in logs if e["event"] == "sampler_not_seeded"]
    assert warning["devices"] == ["fake:0"] and "database away" in warning["error"]
