"""The metering engine: turns stored samples and request rows into per-request, per-phase millijoules, incrementally.

Epochs. Time is cut into fixed wall-clock epochs of ``epoch_ns`` (boundaries at multiples since the Unix epoch).
Each (backend, epoch) is attributed as a whole: its ``request_energy`` rows and its ``backend_epochs`` row are
written (or, for a recompute, deleted and written again) in one transaction together with the change to
``usage_hourly`` (``meter.engine.usage``): running twice, or recomputing, never double counts. Readings are
partitioned among epochs exactly (``meter.engine.readings``), so a backend's ``counter_mj`` summed over its epochs is
its counter's energy over the whole history, less the gaps (failed reads, resets, sampler pauses: never attributed).

A pass (``run_once``): rows written since the last pass are scanned for late data and unrouted requests; the stale
epochs are recomputed one by one; then every epoch now due, of every backend, is attributed with bulk reads (samples
of all devices, request rows of all backends) and one write transaction for all of them (COPY on PostgreSQL). The
transaction takes a lock per backend first (advisory locks on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so two
meters that claim the same backend serialise; the second one's insert of an existing epoch fails and it redoes those
epochs one by one as recomputes.

When an epoch [a, b) of a backend is attributed (the *horizon*), in order, one after the other:

- readings: every device of the backend has a sample with work time (t - lag) at or after b;
- open requests: no request of the backend that is still open (``done_ns`` NULL) was released before b, unless it
  has been open longer than ``open_request_timeout_ns`` (logged; it gets no energy until its row is finished);
- settling: now >= b + ``settle_ns``, so timelines the ledger writes in batches have arrived.

Late data. A request row that arrives after an epoch it overlaps was attributed (``ingested_ns`` > the epoch's
``attributed_at_ns``, e.g. a gateway replica replaying its journal after an outage) makes that epoch stale; each pass
finds such rows through the ``ingested_ns`` index and recomputes their epochs. ``attributed_at_ns`` is stamped
``commit_margin_ns`` before the epoch's inputs were read, so that a row written by a transaction that was still
committing while the engine read counts as late, not as seen.

An epoch whose request rows include one written less than ``commit_margin_ns`` ago waits for a later pass (new
epochs) or stays on the stale list (recomputes), so a batch of timelines is never split across two attributions.

Requests that never reached a backend carry no energy but are counted in ``usage_hourly`` under backend ``''``,
through a zero marker row in ``request_energy`` (backend ``''``) written once when the engine first sees them. A
request its backend refused (``meter.timeline.did_gpu_work``) takes no part in attribution: no energy, no active
time, only its home row.

Idle shares. When it writes an epoch, the engine also splits the epoch's idle energy (``counter - attributed``) into
integer shares per request row, one per idle policy, by largest remainder (``meter.engine.idle.split_idle``): TIME
by the row's active time, TOKENS by the request's prompt + generated tokens times the part of its own window
(``done - released``) inside the epoch. Each share depends only on the epoch and the request's own timeline, so
reports only add stored integers and never disagree.

Finality (``meter.engine.finality``). After each pass the engine *seals* every request of a backend that became
final: its ``done_ns`` is at least ``seal_margin_ns`` (counter lag + calibration reach + settle time) before the
end of the backend's attributed epochs, no epoch that may hold its energy is waiting for a recompute, and every such
epoch was computed after the request's row was last written. The seal (``request_seals``) stores its figures,
the sums of its rows. From then on a recompute (a late row, a calibration move) writes a sealed request's rows back
as they were and re-splits only the others and idle; what the fresh attribution would have given the sealed
requests, less what they hold, is booked to the epoch's ``adjustment_mj``, so that, exactly,
``counter_mj = prefill_mj + decode_mj + idle_mj + adjustment_mj``. Requests are sealed in (done, id) order from a
cursor kept in memory (after a restart, from an hour before the latest seal); late rows found by the scan are held
until their epochs are redone.

Calibration (``calibrate``, on by default; ``meter.engine.calibrate``). The counter lag and the ratio of prefill to
decode power are fitted per backend by least squares over the counter's own readings (leaving out the intervals
near abandoned prefills, whose classes are guesses); once the fit settles (or moves), the backend's recent epochs
are recomputed under it: figures not final yet improve, final ones stay (see Finality). Epoch boundaries and the
readings' partition always use the configured ``lag_ns``; the fitted lag only places the readings against the
timelines inside ``attribute``, so each epoch also looks at requests up to ``reach_ns`` before its start.
Calibration state lives in memory: after a restart it is learned again (a recompute of an old epoch may then use a
slightly different model: conservation holds either way, and final figures stay).

Idle power. With ``idle_power="auto"`` each epoch measures the idle floor over its own reading intervals that no
request came near (``meter.engine.idle``), pooled with those of the backend's recent epochs when it has less than
``min_idle_ns`` of them (in memory: a recompute after a restart may pool fewer), and gives ``attribute`` that
floor: partly idle intervals then book only the floor to idle and the rest to the requests, which matches how a GPU
draws power (and how the simulator's truth splits it). ``"time"`` splits partly idle intervals by time; a number
fixes the floor.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import sqlalchemy as sa
import structlog

from meter.attribution import AttributionPolicy, attribute, request_phases
from meter.engine import sql
from meter.engine.calibrate import ClassTimeline, LagCalibrator, PowerModel
from meter.engine.idle import IdleEstimate, busy_windows, estimate_idle, split_idle
from meter.engine.readings import EpochReadings, Tick, epoch_bounds, epoch_readings, group_ticks
from meter.engine.usage import UsageDeltas, hour_of
from meter.store.retention import prune_samples
from meter.timeline import Timeline

log = structlog.get_logger(__name__)

__all__ = ["EngineSettings", "EngineStats", "MeteredBackend", "MeteringEngine", "PassReport"]

_S = 1_000_000_000
_MS = 1_000_000
_LOOKBEHIND_NS = 1 * _S  # ticks are regrouped from this far before an epoch, so groups match across epochs
_LOOKAHEAD_NS = 1 * _S
_RESTART_LOOKBACK_NS = 60 * _S  # at start, rows written this long before the last attribution are checked again
_MAX_EPOCH_NS = 3600 * _S
_IDLE_HISTORY_EPOCHS = 60  # idle stretches of this many recent epochs measure the floor when one epoch has too few
_RECALIBRATE_EPOCHS = 30  # when the calibration first settles or moves, this many recent epochs are recomputed
_SEAL_LOOKBACK_NS = 3600 * _S  # after a restart, unsealed requests are looked for this far before the latest seal


def _merge_by_time(by_device: dict[str, list[sql.SampleRow]], devices: Sequence[str]) -> list[sql.SampleRow]:
    """The samples of several devices (each already sorted by time) in one list sorted by (time, device)."""
    return sorted((x for d in devices for x in by_device.get(d, ())), key=lambda x: (x.t_ns, x.device))


class _CannotRecomputeError(Exception):
    """A stale epoch whose readings are no longer stored."""


@dataclass(frozen=True, slots=True)
class MeteredBackend:
    """A backend whose energy this engine attributes: its name (as in ``requests.backend``) and its devices."""

    name: str
    devices: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a metered backend needs a name")
        if not self.devices or len(set(self.devices)) != len(self.devices):
            raise ValueError(f"backend {self.name!r}: devices must be non-empty and distinct, got {self.devices}")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    epoch_ns: int = 10 * _S
    settle_ns: int = 2 * _S
    lag_ns: int = 100 * _MS  # counter lag: a reading at t shows the energy spent up to about t - lag
    open_request_timeout_ns: int = 600 * _S
    prefill_tokens_per_s: float = 20_000.0
    prefill_overhead_ns: int = 5 * _MS
    prefill_power_ratio: float = 2.0
    batch_tolerance_ns: int = 2 * _MS
    idle_power: float | Literal["auto", "time"] = "auto"
    idle_margin_ns: int = 50 * _MS  # an interval this close to a request is not used to measure idle power
    min_idle_ns: int = 500 * _MS  # fully idle time an epoch needs to trust its own idle estimate
    tick_gap_ns: int = 40 * _MS  # samples of one tick (several GPUs) follow each other closer than this
    max_interval_ns: int = 5 * _S  # a longer interval between readings is a gap (the sampler was away)
    drop_stale_readings: bool = True
    sample_retention_ns: int | None = 7 * 86_400 * _S
    prune_interval_ns: int = 600 * _S
    max_epochs_per_pass: int = 60  # per backend, so a catch-up never holds the loop for long
    count_unrouted: bool = True  # count requests that never reached a backend (backend '') in usage_hourly
    commit_margin_ns: int = 500 * _MS
    scan_margin_ns: int = 3 * _S  # rows stamped this long before a pass may only become visible after it
    calibrate: bool = True  # fit the lag and the prefill/active power ratio to the counter (meter.engine.calibrate)
    calibration_lags_ns: tuple[int, ...] = tuple(range(0, 201 * _MS, 10 * _MS))  # NVML: one update, <= ~200 ms
    calibration_refresh_ns: int = 30 * _S  # once calibrated, feed the fit one epoch per this much time
    seal_batch: int = 10_000  # requests sealed per backend per pass, at most (a first pass over an old database)

    def __post_init__(self) -> None:
        if not 0 < self.epoch_ns <= _MAX_EPOCH_NS:
            raise ValueError(f"epoch_ns must be within (0, 1 h], got {self.epoch_ns}")
        for name in ("settle_ns", "lag_ns", "open_request_timeout_ns", "idle_margin_ns", "min_idle_ns"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.tick_gap_ns <= 0 or self.max_interval_ns <= 0 or self.max_epochs_per_pass < 1:
            raise ValueError("tick_gap_ns, max_interval_ns and max_epochs_per_pass must be positive")
        if not self.calibration_lags_ns or min(self.calibration_lags_ns) < 0:
            raise ValueError("calibration_lags_ns must be a non-empty set of lags >= 0")
        if isinstance(self.idle_power, str):
            if self.idle_power not in ("auto", "time"):
                raise ValueError(f"idle_power must be 'auto', 'time' or watts, got {self.idle_power!r}")
        elif not self.idle_power >= 0:
            raise ValueError(f"idle_power must be >= 0 W, got {self.idle_power}")
        self.policy(None)  # validates the attribution parameters

    def policy(
        self, idle_power_w: float | None, lag_ns: int | None = None, prefill_power_ratio: float | None = None
    ) -> AttributionPolicy:
        return AttributionPolicy(
            lag_ns=self.lag_ns if lag_ns is None else lag_ns,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            prefill_overhead_ns=self.prefill_overhead_ns,
            prefill_power_ratio=self.prefill_power_ratio if prefill_power_ratio is None else prefill_power_ratio,
            idle_power_w=idle_power_w,
            batch_tolerance_ns=self.batch_tolerance_ns,
        )

    @property
    def min_lag_ns(self) -> int:
        """The smallest lag attribution may use (calibration may pick a smaller one than ``lag_ns``)."""
        return min(self.lag_ns, *self.calibration_lags_ns) if self.calibrate else self.lag_ns

    @property
    def seal_margin_ns(self) -> int:
        """A request is sealed once its backend is attributed until at least ``done + seal_margin_ns``: past the
        counter lag and the settle time, and past every epoch whose readings may reach back to it (``reach_ns``)."""
        return self.lag_ns + self.reach_ns + self.settle_ns

    @property
    def reach_ns(self) -> int:
        """How far before an epoch's start its readings' work time may reach with a calibrated (larger) lag."""
        return max(0, max(self.calibration_lags_ns) - self.lag_ns) if self.calibrate else 0


@dataclass(slots=True)
class PassReport:
    """What one ``run_once`` did."""

    attributed: list[tuple[str, int]] = field(default_factory=list)  # (backend, epoch_start_ns), new
    recomputed: list[tuple[str, int]] = field(default_factory=list)  # (backend, epoch_start_ns), stale before
    unrouted_counted: int = 0
    requests_attributed: int = 0  # request_energy rows written
    sealed: int = 0  # requests sealed (their figures final)
    adjustment_mj: int = 0  # energy recomputes booked to their epochs' adjustment instead of sealed requests
    pruned_samples: int = 0


@dataclass(frozen=True, slots=True)
class EngineStats:
    passes: int
    epochs_attributed: int
    epochs_recomputed: int
    request_rows_written: int
    requests_sealed: int
    adjustment_mj: int  # signed sum booked by recomputes: + the sealed requests would have got more, - less
    adjusted_epochs: int  # recomputes that booked a non-zero adjustment
    unrouted_counted: int
    errors: int
    last_error: str | None
    attributed_until_ns: dict[str, int | None]  # per backend: end of its last attributed epoch
    idle_power_w: dict[str, float | None]  # per backend: the idle floor in use
    calibration: dict[str, PowerModel | None]  # per backend: the fitted lag and powers, once settled


@dataclass(slots=True)
class _Backend:
    spec: MeteredBackend
    until_ns: int | None = None  # end of the last attributed epoch (the next one starts here)
    span_end_ns: int | None = None  # work-time end of the last epoch's readings (>= until_ns)
    loaded: bool = False
    idle_power_w: float | None = None
    idle_history: deque[IdleEstimate] = field(default_factory=lambda: deque(maxlen=_IDLE_HISTORY_EPOCHS))
    stale: dict[int, int] = field(default_factory=dict)  # epochs to recompute (start -> end), found by the scan
    calibrator: LagCalibrator | None = None
    calibrated_at_ns: int | None = None  # start of the last epoch fed to the calibrator
    recent: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=_RECALIBRATE_EPOCHS))
    timeout_logged_ns: int = 0
    seal_after: tuple[int, str] | None = None  # every request up to this (done_ns, request_id) was looked at
    held: set[str] = field(default_factory=set)  # looked at but not sealable yet (a stale epoch, a late row)
    sealed_done_ns: int | None = None  # the latest done_ns of a request sealed so far (None: nothing sealed)


@dataclass(frozen=True, slots=True)
class _Share:
    """One request's energy in one epoch as a fresh attribution computes it, and what usage needs of it."""

    prefill_mj: int
    decode_mj: int
    active_ns: int
    idle_time_mj: int
    idle_tokens_mj: int
    usage_key: tuple[int, str, str, str]
    is_home: bool
    prompt_tokens: int
    generated_tokens: int


@dataclass(frozen=True, slots=True)
class _Final:
    request_rows: list[sql.RequestEnergyRow]
    epoch_row: sql.BackendEpochRow
    usage: UsageDeltas
    adjustment_mj: int


@dataclass(slots=True)
class _EpochResult:
    """A fresh attribution of one epoch. ``finish`` turns it into the rows to write, keeping sealed requests' rows
    as they are (pinned) and booking what the fresh attribution would have moved to or from them to the epoch's
    ``adjustment_mj``."""

    backend: str
    start: int
    end: int
    readings: EpochReadings
    attributed_at: int
    shares: dict[str, _Share]
    idle_mj: int  # the fresh attribution's idle bucket

    @property
    def request_ids(self) -> list[str]:
        return list(self.shares)

    def finish(self, pinned: Sequence[sql.PinnedRow] = (), sealed: set[str] | frozenset[str] = frozenset()) -> _Final:
        """``pinned``: the epoch's current rows of sealed requests (``sql.pinned_rows``); ``sealed``: ids of sealed
        requests (those in ``pinned`` and any other), whose fresh shares are dropped.

        Identity, exact to the mJ: ``counter_mj = prefill_mj + decode_mj + idle_mj + adjustment_mj``, where
        ``adjustment_mj = (fresh energy of sealed requests) - (their pinned energy)``: positive when the recompute
        would have given sealed requests more than they were billed (that energy is billed to no one), negative
        when it would have given them less (that much is billed twice: to them and to the requests it now goes to).
        """
        name, start, end = self.backend, self.start, self.end
        rows: list[sql.RequestEnergyRow] = []
        usage = UsageDeltas()
        prefill_sum = decode_sum = active_sum = 0
        fresh_sealed = 0
        for rid, sh in self.shares.items():
            if rid in sealed:
                fresh_sealed += sh.prefill_mj + sh.decode_mj
                continue
            rows.append(
                sql.RequestEnergyRow(
                    rid, start, name, sh.prefill_mj, sh.decode_mj, sh.active_ns, sh.idle_time_mj, sh.idle_tokens_mj
                )
            )
            usage.add(
                sh.usage_key,
                (int(sh.is_home), sh.prompt_tokens * sh.is_home, sh.generated_tokens * sh.is_home, sh.prefill_mj,
                 sh.decode_mj, sh.active_ns),
            )  # fmt: skip
        pinned_sum = 0
        for p in pinned:
            pinned_sum += p.prefill_mj + p.decode_mj
            rows.append(
                sql.RequestEnergyRow(
                    p.request_id, start, name, p.prefill_mj, p.decode_mj, p.active_ns, p.idle_time_mj, p.idle_tokens_mj
                )
            )
            home = p.done_ns is not None and start <= p.done_ns < end
            key = (hour_of(p.received_ns), p.tenant, p.model_id, name)
            usage.add(
                key,
                (int(home), p.prompt_tokens * home, p.generated_tokens * home, p.prefill_mj, p.decode_mj, p.active_ns),
            )
        for r in rows:
            prefill_sum += r.prefill_mj
            decode_sum += r.decode_mj
            active_sum += r.active_ns
        readings = self.readings
        attributed = prefill_sum + decode_sum
        adjustment = fresh_sealed - pinned_sum
        if attributed + self.idle_mj + adjustment != readings.counter_mj:
            raise AssertionError(f"{name} epoch {start}: the books do not balance")
        epoch_row = sql.BackendEpochRow(
            backend=name,
            epoch_start_ns=start,
            epoch_end_ns=end,
            first_reading_ns=readings.first_reading_ns,
            last_reading_ns=readings.last_reading_ns,
            counter_mj=readings.counter_mj,
            attributed_mj=attributed,
            prefill_mj=prefill_sum,
            decode_mj=decode_sum,
            idle_mj=self.idle_mj,
            samples=readings.samples,
            gaps=readings.gaps,
            active_ns_total=active_sum,
            attributed_at_ns=self.attributed_at,
            adjustment_mj=adjustment,
        )
        return _Final(rows, epoch_row, usage, adjustment)


class MeteringEngine:
    """Attributes the energy of ``backends`` epoch by epoch. Not thread-safe: one thread calls ``run_once``."""

    def __init__(
        self,
        db: sa.Engine,
        backends: Sequence[MeteredBackend],
        settings: EngineSettings | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        self._db = db
        self.settings = settings or EngineSettings()
        self._clock = clock
        self._backends: dict[str, _Backend] = {}
        self.set_backends(backends)
        self._scan_lo_ns: int | None = None
        self._pinned_ns: int | None = None  # run_once(now_ns): the clock stands still during that pass
        self._last_prune_ns = 0
        self._passes = 0
        self._epochs = 0
        self._recomputed = 0
        self._rows = 0
        self._sealed = 0
        self._adjustment_mj = 0
        self._adjusted_epochs = 0
        self._report: PassReport | None = None  # the pass in progress
        self._unrouted = 0
        self._errors = 0
        self._last_error: str | None = None

    # -- configuration ---------------------------------------------------------------------------------------------

    def set_backends(self, backends: Sequence[MeteredBackend]) -> None:
        """Replace the backends (e.g. once a simulator has told its device name); state of kept ones survives."""
        names = [b.name for b in backends]
        if len(set(names)) != len(names):
            raise ValueError(f"backend names must be distinct: {names}")
        kept: dict[str, _Backend] = {}
        for spec in backends:
            old = self._backends.get(spec.name)
            if old is not None and old.spec.devices == spec.devices:
                kept[spec.name] = old
            else:
                kept[spec.name] = _Backend(spec)
        self._backends = kept

    @property
    def backends(self) -> tuple[MeteredBackend, ...]:
        return tuple(b.spec for b in self._backends.values())

    @property
    def stats(self) -> EngineStats:
        return EngineStats(
            passes=self._passes,
            epochs_attributed=self._epochs,
            epochs_recomputed=self._recomputed,
            request_rows_written=self._rows,
            requests_sealed=self._sealed,
            adjustment_mj=self._adjustment_mj,
            adjusted_epochs=self._adjusted_epochs,
            unrouted_counted=self._unrouted,
            errors=self._errors,
            last_error=self._last_error,
            attributed_until_ns={n: b.until_ns if b.loaded else None for n, b in self._backends.items()},
            idle_power_w={n: b.idle_power_w for n, b in self._backends.items()},
            calibration={n: b.calibrator.model if b.calibrator else None for n, b in self._backends.items()},
        )

    # -- the pass --------------------------------------------------------------------------------------------------

    def run_once(self, now_ns: int | None = None) -> PassReport:
        """Recompute stale epochs, attribute every epoch that is due, count new unrouted requests, prune samples.

        Raises on database errors (nothing is half written: a recompute, or the batch of new epochs, is one
        transaction); the caller retries on its next pass, which starts again from what the database holds.
        """
        self._pinned_ns = now_ns
        now = self._now()
        report = self._report = PassReport()
        try:
            self._load()
            self._scan_ingested(now, report)
            plan = self._plan(now, self._open_requests(now))
            if plan:
                self._attribute_planned(plan, report)
            self._seal(now, report)
            self._maybe_prune(now, report)
        except Exception as exc:
            self._errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            for b in self._backends.values():
                b.loaded = False  # re-read the state from the database next time
            raise
        finally:
            self._passes += 1
            self._pinned_ns = None
            self._report = None
        return report

    def _now(self) -> int:
        return self._clock() if self._pinned_ns is None else self._pinned_ns

    def _load(self) -> None:
        todo = [b for b in self._backends.values() if not b.loaded]
        if not todo:
            return
        with self._db.connect() as conn:
            for b in todo:
                b.sealed_done_ns = sql.last_sealed_done(conn, b.spec.name)
                # Requests are sealed in (done_ns, id) order; after a restart look again from a while before the
                # latest seal, for requests that were held back (a stale epoch) when the last run stopped.
                b.seal_after = None if b.sealed_done_ns is None else (b.sealed_done_ns - _SEAL_LOOKBACK_NS, "")
                b.held.clear()
                last = sql.last_epoch(conn, b.spec.name)
                if last is None:
                    b.until_ns = b.span_end_ns = None
                else:
                    end = last.epoch_end_ns
                    b.until_ns = end
                    b.span_end_ns = max(end, (last.last_reading_ns or end) - self.settings.min_lag_ns)
                    lo = last.attributed_at_ns - _RESTART_LOOKBACK_NS  # a row the last run found but did not redo
                    if self._scan_lo_ns is None or lo < self._scan_lo_ns:
                        self._scan_lo_ns = lo
                b.loaded = True
        if self._scan_lo_ns is None:
            self._scan_lo_ns = 0  # nothing attributed yet: look at every row once

    # -- open requests ---------------------------------------------------------------------------------------------

    def _open_requests(self, now: int) -> dict[str, int]:
        """Per backend, the earliest release of an open request that still holds attribution back."""
        cutoff = now - self.settings.open_request_timeout_ns
        with self._db.connect() as conn:
            rows = sql.open_requests(conn, list(self._backends), cutoff)
        out: dict[str, int] = {}
        stuck: dict[str, int] = {}
        for r in rows:
            if r.earliest_released_ns is not None:
                out[r.backend] = int(r.earliest_released_ns)
            if r.timed_out:
                stuck[r.backend] = int(r.timed_out)
        for backend, n in stuck.items():
            b = self._backends[backend]
            if now - b.timeout_logged_ns >= 60 * _S:
                b.timeout_logged_ns = now
                log.warning(
                    "engine_open_requests_timed_out",
                    backend=backend,
                    requests=n,
                    open_request_timeout_s=self.settings.open_request_timeout_ns / _S,
                    detail="attributing past them; they get energy once their timelines arrive",
                )
        return out

    # -- new epochs ------------------------------------------------------------------------------------------------

    def _plan(self, now: int, open_since: dict[str, int]) -> dict[str, list[tuple[int, int]]]:
        """The epochs due now, per backend, in order (at most ``max_epochs_per_pass`` each)."""
        s = self.settings
        devices = sorted({d for b in self._backends.values() for d in b.spec.devices})
        with self._db.connect() as conn:
            last = dict(zip(devices, sql.last_samples(conn, devices), strict=True))
            for b in self._backends.values():
                if b.until_ns is None and all(last[d] is not None for d in b.spec.devices):
                    first = sql.first_sample_at_or_after(conn, b.spec.devices, 0)
                    assert first is not None
                    b.until_ns = epoch_bounds(first - s.lag_ns, s.epoch_ns)[0]
        plan: dict[str, list[tuple[int, int]]] = {}
        for name, b in self._backends.items():
            lasts = [last[d] for d in b.spec.devices]
            if b.until_ns is None or any(t is None for t in lasts):
                continue  # some device has never been read: nothing to attribute yet
            latest = min(t for t in lasts if t is not None)
            horizon = min(latest - s.lag_ns - 2 * s.tick_gap_ns, now - s.settle_ns)
            if name in open_since:
                horizon = min(horizon, open_since[name])
            epochs = []
            start = b.until_ns
            for _ in range(s.max_epochs_per_pass):
                end = start - start % s.epoch_ns + s.epoch_ns
                if end > horizon:
                    break
                epochs.append((start, end))
                start = end
            if epochs:
                plan[name] = epochs
        return plan

    def _attribute_planned(self, plan: dict[str, list[tuple[int, int]]], report: PassReport) -> None:
        """Attribute every planned (new) epoch with bulk reads and ONE write transaction for all of them."""
        s = self.settings
        attributed_at = self._now() - s.commit_margin_ns
        starts = [e[0] for eps in plan.values() for e in eps]
        ends = [e[1] for eps in plan.values() for e in eps]
        devices = sorted({d for name in plan for d in self._backends[name].spec.devices})
        with self._db.connect() as conn:
            samples = sql.samples_between(
                conn, devices, min(starts) + s.lag_ns - _LOOKBEHIND_NS, max(ends) + s.lag_ns + _LOOKAHEAD_NS
            )
            by_device: dict[str, list[sql.SampleRow]] = {}
            for x in samples:
                by_device.setdefault(x.device, []).append(x)
            ready: dict[str, list[tuple[int, int, EpochReadings]]] = {}
            for name, epochs in plan.items():
                b = self._backends[name]
                devices = b.spec.devices
                mine = by_device.get(devices[0], []) if len(devices) == 1 else _merge_by_time(by_device, devices)
                ticks = group_ticks(mine, devices, s.tick_gap_ns)
                for start, end in epochs:
                    readings = self._readings(ticks, start, end)
                    if readings is None:  # the sampler paused past the window read: read up to its next sample
                        readings = self._readings(self._ticks(conn, b.spec.devices, start, end), start, end)
                    if readings is None:
                        break  # no boundary reading yet: a later pass
                    ready.setdefault(name, []).append((start, end, readings))
            if not ready:
                return
            flat = [e for r in ready.values() for e in r]
            lo = min(start for start, _e, _r in flat)
            hi = max(max(end, r.boundary_ns - s.min_lag_ns) for _s, end, r in flat)
            rows = sql.requests_of(
                conn, list(ready), lo - s.reach_ns, max(end for _s, end, _r in flat), hi, lo - s.open_request_timeout_ns
            )
        by_backend: dict[str, list[sql.RequestRow]] = {}
        for row in rows:
            by_backend.setdefault(row.backend, []).append(row)
        results: list[tuple[_Backend, int, int, EpochReadings, _EpochResult]] = []
        maybe_sealed: list[str] = []  # ids that ended before the latest sealed request of their backend
        for name, epochs in ready.items():
            b = self._backends[name]
            for (start, end, readings), mine in zip(epochs, self._split(epochs, by_backend.get(name, [])), strict=True):
                if any(r.ingested_ns > attributed_at for r in mine):
                    break  # a row is still fresh: this epoch and the later ones wait for a later pass
                results.append((b, start, end, readings, self._compute(b, start, end, readings, mine, attributed_at)))
                if b.sealed_done_ns is not None:
                    maybe_sealed += [r.request_id for r in mine if r.done_ns <= b.sealed_done_ns]
        if not results:
            return
        finals: list[_Final] = []
        try:
            with sql.locked_transaction(self._db, sorted(ready)) as conn:
                # A new epoch never holds a sealed request (sealing waits until epochs past its reach are attributed);
                # should settings have changed since, its rows stay pinned all the same.
                sealed = sql.sealed_among(conn, maybe_sealed) if maybe_sealed else set()
                finals = [r[4].finish((), sealed) for r in results]
                sql.insert_request_energy(conn, [row for f in finals for row in f.request_rows])
                sql.insert_backend_epochs(conn, [f.epoch_row for f in finals])
                usage = UsageDeltas()
                for f in finals:
                    for k, v in f.usage.as_dict().items():
                        usage.add(k, v)
                sql.add_usage(conn, usage.rows())
        except sa.exc.IntegrityError:
            # Another meter wrote one of these epochs first: redo them one by one (each replaces what is there).
            log.warning("engine_batch_conflict", epochs=len(results), detail="retrying epoch by epoch")
            for b, start, end, _readings, _result in results:
                if self._attribute(b, start, end, self._now(), existing=False) is None:
                    break
                report.attributed.append((b.spec.name, start))
            return
        for (b, start, end, readings, _result), final in zip(results, finals, strict=True):
            self._advanced(b, end, readings)
            self._epochs += 1
            self._rows += len(final.request_rows)
            self._booked(b.spec.name, start, final.adjustment_mj)
            report.attributed.append((b.spec.name, start))
            report.requests_attributed += len(final.request_rows)

    def _readings(self, ticks: list[Tick], start: int, end: int) -> EpochReadings | None:
        s = self.settings
        return epoch_readings(ticks, start, end, s.lag_ns, s.max_interval_ns, drop_stale=s.drop_stale_readings)

    def _split(
        self, epochs: list[tuple[int, int, EpochReadings]], rows: list[sql.RequestRow]
    ) -> list[list[sql.RequestRow]]:
        """The request rows each of a backend's consecutive epochs needs (as ``sql.epoch_requests`` selects them)."""
        s = self.settings
        reach = s.reach_ns
        starts = [e[0] for e in epochs]
        his = [max(end, r.boundary_ns - s.min_lag_ns) for _s, end, r in epochs]  # non-decreasing
        out: list[list[sql.RequestRow]] = [[] for _ in epochs]
        for row in rows:
            released, done = row.released_ns, row.done_ns
            k_lo = bisect_right(his, released)  # the first epoch whose readings reach past the release
            k_hi = bisect_right(starts, done + reach)  # past the last epoch whose readings start before done
            for k in range(k_lo, k_hi):  # they overlap; the release bound only skips over-long requests
                start, end, _r = epochs[k]
                if released >= start - s.open_request_timeout_ns or done < end:
                    out[k].append(row)
            if k_lo >= k_hi > 0 and done < epochs[k_hi - 1][1]:
                out[k_hi - 1].append(row)  # an over-long request, in the epoch where it ended (its home)
        return out

    def _advanced(self, b: _Backend, end: int, readings: EpochReadings) -> None:
        s = self.settings
        b.until_ns = max(end, b.until_ns or end)
        span_end = max(end, (readings.last_reading_ns or end) - s.min_lag_ns)
        b.span_end_ns = max(span_end, b.span_end_ns or span_end)

    # -- stale epochs ----------------------------------------------------------------------------------------------

    def _scan_ingested(self, now: int, report: PassReport) -> None:
        """Find rows written since the last pass that are late for an attributed epoch, or unrouted and new; then
        recompute every stale epoch whose rows have settled (the others wait for a later pass)."""
        s = self.settings
        lo = self._scan_lo_ns if self._scan_lo_ns is not None else 0
        bounds = {n: b.span_end_ns for n, b in self._backends.items() if b.span_end_ns is not None}
        released_before = max(bounds.values()) if bounds else None
        with self._db.connect() as conn:
            rows = sql.ingested_since(conn, lo, list(bounds), released_before, s.count_unrouted)
        unrouted: list[sql.IngestedRow] = []
        late: dict[str, list[sql.IngestedRow]] = {}
        for row in rows:
            backend = row.backend
            if backend is None:
                unrouted.append(row)
            elif backend in bounds and row.released_ns is not None and row.released_ns < bounds[backend]:
                late.setdefault(backend, []).append(row)
        for backend, cand in late.items():
            b = self._backends[backend]
            b.stale.update(self._stale_epochs(backend, cand))
            b.held.update(r.request_id for r in cand)  # sealed once their epochs are redone, if they are not sealed yet
        self._scan_lo_ns = now - s.scan_margin_ns  # what is found is remembered in `stale` until it is redone
        for name, b in self._backends.items():
            for start in sorted(b.stale):
                if b.until_ns is None or start >= b.until_ns:
                    del b.stale[start]  # not attributed (any more): the normal path will do it, in order
                    continue
                try:
                    done = self._attribute(b, start, b.stale[start], now, existing=True)
                except _CannotRecomputeError:
                    del b.stale[start]
                    continue
                if done is not None:
                    del b.stale[start]
                    report.recomputed.append((name, start))
        if unrouted:
            report.unrouted_counted += self._count_unrouted(unrouted)

    def _stale_epochs(self, backend: str, rows: list[sql.IngestedRow]) -> dict[int, int]:
        """The attributed epochs (start -> end) of ``backend`` that one of ``rows`` overlaps and is newer than."""
        s = self.settings
        min_released = min(r.released_ns for r in rows if r.released_ns is not None)
        max_done = max(r.done_ns for r in rows if r.done_ns is not None)
        with self._db.connect() as conn:
            reach = 2 * s.epoch_ns + s.lag_ns + s.max_interval_ns  # an overlapping epoch starts no earlier
            epochs = sql.epochs_in(conn, backend, min_released - reach, max_done)
        if not epochs:
            return {}
        starts = [e.epoch_start_ns for e in epochs]
        ends = [e.epoch_end_ns for e in epochs]
        stale: dict[int, int] = {}
        for r in rows:
            released, done, ingested = r.released_ns, r.done_ns, r.ingested_ns
            assert released is not None and done is not None  # ingested_since: finished rows of a backend
            # The epochs whose span can hold [released, done]: from the one before the epoch holding `released` (its
            # readings may reach past its end) to the last one starting at or before `done`.
            first = max(0, bisect_right(ends, released) - 1)
            for i in range(first, bisect_right(starts, done)):
                e = epochs[i]
                span_end = max(e.epoch_end_ns, (e.last_reading_ns or e.epoch_end_ns) - s.min_lag_ns)
                if released < span_end and done >= e.epoch_start_ns and ingested > e.attributed_at_ns:
                    stale[e.epoch_start_ns] = e.epoch_end_ns
        if stale:
            log.info("engine_late_rows", backend=backend, rows=len(rows), stale_epochs=len(stale))
        return stale

    # -- one epoch -------------------------------------------------------------------------------------------------

    def _ticks(self, conn: sa.Connection, devices: tuple[str, ...], start: int, end: int) -> list[Tick]:
        """The ticks from a second before the epoch to a second past its boundary tick."""
        s = self.settings
        lo = start + s.lag_ns - _LOOKBEHIND_NS
        hi = end + s.lag_ns + _LOOKAHEAD_NS
        ticks = group_ticks(sql.samples_between(conn, devices, lo, hi), devices, s.tick_gap_ns)
        if len(ticks) >= 2 and ticks[-2].t_ns >= end + s.lag_ns:  # the boundary tick is complete
            return ticks
        nxt = sql.first_sample_at_or_after(conn, devices, end + s.lag_ns)
        if nxt is None or nxt + _LOOKAHEAD_NS <= hi:
            return ticks
        return group_ticks(sql.samples_between(conn, devices, lo, nxt + _LOOKAHEAD_NS), devices, s.tick_gap_ns)

    def _attribute(self, b: _Backend, start: int, end: int, now: int, *, existing: bool) -> int | None:
        """Attribute (or recompute) epoch [start, end) of ``b``; returns the request rows written, None if its
        readings are not complete."""
        s = self.settings
        name = b.spec.name
        attributed_at = self._now() - s.commit_margin_ns
        with self._db.connect() as conn:
            readings = self._readings(self._ticks(conn, b.spec.devices, start, end), start, end)
            if readings is None:
                if existing:  # its samples are gone (pruned): the epoch stays as it was
                    log.warning("engine_recompute_without_readings", backend=name, epoch_start_ns=start)
                    raise _CannotRecomputeError
                return None
            hi = max(end, readings.boundary_ns - s.min_lag_ns)
            rows = sql.epoch_requests(conn, name, start - s.reach_ns, end, hi, start - s.open_request_timeout_ns)
        if any(r.ingested_ns > attributed_at for r in rows):
            return None  # a row is still fresh (another may still be committing): a later pass, not a recompute
        result = self._compute(b, start, end, readings, rows, attributed_at, learn=not existing)
        final: _Final | None = None
        for attempt in (0, 1):
            try:
                with sql.locked_transaction(self._db, name) as conn:
                    final = self._write(conn, name, start, end, result)
                break
            except sa.exc.IntegrityError:
                if attempt:
                    raise
                with self._db.connect() as conn:
                    excluded = sql.conflicting_request_energy(conn, start, name, result.request_ids)
                if not excluded:
                    raise
                log.error(
                    "engine_request_in_two_backends",
                    backend=name,
                    epoch_start_ns=start,
                    requests=sorted(excluded)[:10],
                    detail="their energy in this epoch goes to idle",
                )
                kept = [r for r in rows if r.request_id not in excluded]
                result = self._compute(b, start, end, readings, kept, attributed_at, learn=False)
        assert final is not None
        if not existing or end == b.until_ns:  # a recompute never moves "attributed until"; it may move the span
            self._advanced(b, end, readings)
        if existing:
            self._recomputed += 1
        else:
            self._epochs += 1
        self._booked(name, start, final.adjustment_mj)
        self._rows += len(final.request_rows)
        return len(final.request_rows)

    def _booked(self, name: str, start: int, adjustment_mj: int) -> None:
        if adjustment_mj:
            self._adjustment_mj += adjustment_mj
            self._adjusted_epochs += 1
            if self._report is not None:
                self._report.adjustment_mj += adjustment_mj
            log.info(
                "engine_sealed_requests_adjustment",
                backend=name,
                epoch_start_ns=start,
                adjustment_mj=adjustment_mj,
                detail="a recompute left sealed requests as they were; the difference is booked to the epoch",
            )

    def _compute(
        self,
        b: _Backend,
        start: int,
        end: int,
        readings: EpochReadings,
        rows: list[sql.RequestRow],
        attributed_at: int,
        *,
        learn: bool = True,
    ) -> _EpochResult:
        """The epoch's fresh attribution, from its readings and request rows. ``learn``: a
        new epoch may feed the calibration."""
        s = self.settings
        name = b.spec.name
        timelines: list[Timeline] = []
        for r in rows:
            try:
                timelines.append(
                    Timeline(
                        r.request_id, r.tenant, r.model_id, name, r.received_ns, r.released_ns, r.first_token_ns,
                        r.done_ns, r.prompt_tokens, r.generated_tokens, status=r.status or "UNKNOWN",
                    )
                )  # fmt: skip
            except ValueError as exc:
                log.error("engine_bad_request_row", backend=name, request_id=r.request_id, error=str(exc))
        working = [t for t in timelines if t.on_gpu]  # the billing rule: refused requests take no part
        works = {t.request_id for t in working}

        model = self._calibration(b, start, readings, working, learn)
        if learn:
            b.recent.append((start, end))
        lag = model.lag_ns if model is not None else s.lag_ns
        idle_w = self._idle_power(b, readings, working, lag)
        policy = s.policy(idle_w, lag, model.prefill_power_ratio if model is not None else None)
        energy: dict[str, list[int]] = {}
        for segment in readings.segments:
            seg_lo, seg_hi = segment[0].t_ns - lag, segment[-1].t_ns - lag
            part = [t for t in working if t.released_ns < seg_hi and t.done_ns >= seg_lo]  # type: ignore[operator]
            if not part:
                continue
            got = attribute(segment, part, policy)
            for rid, pe in got.requests.items():
                acc = energy.get(rid)
                if acc is None:
                    energy[rid] = [pe.prefill_mj, pe.decode_mj]
                else:
                    acc[0] += pe.prefill_mj
                    acc[1] += pe.decode_mj

        kept: list[tuple[str, int, int, int, bool, tuple[int, str, str, str], int, int, float]] = []
        attributed = 0
        for r in rows:
            rid, released, done, prompt, generated = (
                r.request_id, r.released_ns, r.done_ns, r.prompt_tokens, r.generated_tokens
            )  # fmt: skip
            on_gpu = rid in works
            active = max(0, min(done, end) - max(released, start)) if on_gpu else 0
            is_home = start <= done < end
            e = energy.get(rid)
            if e is None and not active and not is_home:
                continue
            pre, dec = (e[0], e[1]) if e is not None else (0, 0)
            attributed += pre + dec
            window = done - released
            # TOKENS idle weight: the request's tokens, apportioned to this epoch by its own active time in it.
            token_w = (prompt + generated) * active / window if on_gpu and window > 0 else 0.0
            kept.append((rid, pre, dec, active, is_home, (hour_of(r.received_ns), r.tenant, r.model_id, name), prompt,
                         generated, token_w))  # fmt: skip
        if attributed > readings.counter_mj:
            raise AssertionError(f"{name} epoch {start}: attributed {attributed} mJ > counter {readings.counter_mj}")
        idle_mj = readings.counter_mj - attributed
        by_time = split_idle(idle_mj, {k[0]: float(k[3]) for k in kept})
        by_tokens = split_idle(idle_mj, {k[0]: k[8] for k in kept})
        shares = {
            rid: _Share(pre, dec, active, by_time[rid], by_tokens[rid], key, is_home, prompt, generated)
            for rid, pre, dec, active, is_home, key, prompt, generated, _w in kept
        }
        return _EpochResult(name, start, end, readings, attributed_at, shares, idle_mj)

    def _calibration(
        self, b: _Backend, start: int, readings: EpochReadings, timelines: list[Timeline], learn: bool
    ) -> PowerModel | None:
        """The backend's calibrated power model; feeds it this epoch while it is young, then now and then."""
        s = self.settings
        if not s.calibrate:
            return None
        if b.calibrator is None:
            b.calibrator = LagCalibrator(s.calibration_lags_ns)
        cal = b.calibrator
        due = cal.warming or b.calibrated_at_ns is None or start - b.calibrated_at_ns >= s.calibration_refresh_ns
        if learn and due and timelines and readings.segments:
            uncertain = [(t.released_ns, t.done_ns) for t in timelines if t.abandoned_prefill]
            classes = ClassTimeline.from_phases(request_phases(timelines, s.policy(None), since_ns=start), uncertain)  # type: ignore[arg-type]
            before = cal.model
            cal.add(readings.segments, classes, b.idle_power_w if s.idle_power == "auto" else None)
            b.calibrated_at_ns = start
            m = cal.model
            if m is not None and (
                before is None
                or abs(before.lag_ns - m.lag_ns) >= 20 * _MS
                or abs(before.prefill_power_ratio / m.prefill_power_ratio - 1) > 0.1
            ):
                # The model settled or moved: the epochs attributed under the old one are redone (exactly, as any
                # recompute), so that a backend's recent history shares one model.
                b.stale.update((e_start, e_end) for e_start, e_end in b.recent if e_start < start)
                log.info(
                    "engine_calibrated",
                    backend=b.spec.name,
                    lag_ms=m.lag_ns / _MS,
                    prefill_w=round(m.prefill_w, 1),
                    active_w=round(m.active_w, 1),
                    idle_w=None if m.idle_w is None else round(m.idle_w, 1),
                    intervals=m.intervals,
                    recomputing=sum(1 for e_start, _e in b.recent if e_start < start),
                )
        return cal.model

    def _idle_power(self, b: _Backend, readings: EpochReadings, timelines: list[Timeline], lag: int) -> float | None:
        s = self.settings
        if not isinstance(s.idle_power, str):
            return float(s.idle_power)
        if s.idle_power == "time":
            return None
        busy = busy_windows((t.released_ns, t.done_ns) for t in timelines)  # type: ignore[misc]
        est = estimate_idle(readings.segments, busy, lag, s.idle_margin_ns)
        if est.duration_ns >= s.min_idle_ns:  # enough idle time in this epoch alone
            b.idle_history.clear()
        if est.duration_ns > 0:
            b.idle_history.append(est)
        total = IdleEstimate(sum(e.energy_mj for e in b.idle_history), sum(e.duration_ns for e in b.idle_history))
        if total.duration_ns >= s.min_idle_ns and total.power_w is not None:
            b.idle_power_w = total.power_w
        return b.idle_power_w

    def _write(self, conn: sa.Connection, name: str, start: int, end: int, result: _EpochResult) -> _Final:
        """Replace the epoch's rows (sealed requests' rows stay as they are) and add the usage change; inside the
        locked transaction, so that no seal can appear between reading the pins and writing."""
        usage = UsageDeltas()
        exists = sql.epoch_attributed_at(conn, name, start) is not None
        pinned = sql.pinned_rows(conn, name, start) if exists else []
        sealed = {r.request_id for r in pinned} | sql.sealed_among(conn, result.request_ids)
        final = result.finish(pinned, sealed)
        for k, v in final.usage.as_dict().items():
            usage.add(k, v)
        if exists:
            for c in sql.old_epoch_contribution(conn, name, start):
                key = (hour_of(c.received_ns), c.tenant, c.model_id, name)
                home = c.done_ns is not None and start <= c.done_ns < end
                usage.add(
                    key,
                    (int(home), c.prompt_tokens * home, c.generated_tokens * home, c.prefill_mj, c.decode_mj,
                     c.active_ns),
                    sign=-1,
                )  # fmt: skip
            sql.delete_epoch(conn, name, start)
        sql.insert_request_energy(conn, final.request_rows)
        sql.insert_backend_epoch(conn, final.epoch_row)
        sql.add_usage(conn, usage.rows())
        return final

    # -- requests that never reached a backend ---------------------------------------------------------------------

    def _count_unrouted(self, rows: list[sql.IngestedRow]) -> int:
        """Write a zero marker row (backend '') for each new one and count it in usage_hourly, exactly once."""
        s = self.settings
        epoch_of = {r.request_id: epoch_bounds(r.done_ns, s.epoch_ns)[0] for r in rows if r.done_ns is not None}
        if not epoch_of:
            return 0
        by_id = {r.request_id: r for r in rows}
        lo, hi = min(epoch_of.values()), max(epoch_of.values())
        with sql.locked_transaction(self._db, "") as conn:
            seen = sql.unrouted_markers(conn, lo, hi)
            new = [rid for rid in epoch_of if rid not in seen]
            if not new:
                return 0
            usage = UsageDeltas()
            markers = []
            for rid in new:
                r = by_id[rid]
                markers.append(sql.RequestEnergyRow(rid, epoch_of[rid], "", 0, 0, 0, 0, 0))
                usage.add(
                    (hour_of(r.received_ns), r.tenant, r.model_id, ""),
                    (1, r.prompt_tokens, r.generated_tokens, 0, 0, 0),
                )
            sql.insert_request_energy(conn, markers)
            sql.add_usage(conn, usage.rows())
        self._unrouted += len(new)
        return len(new)

    # -- sealing ---------------------------------------------------------------------------------------------------

    def _seal(self, now: int, report: PassReport) -> None:
        """Seal every request that became final: its backend is attributed until ``done + seal_margin_ns``, no epoch
        that may hold its energy is stale, and each was computed after the request's row was last written. Its
        figures (sums of its rows, idle shares included) go to ``request_seals``; from then on a recompute keeps
        its rows as they are (``_EpochResult.finish``)."""
        s = self.settings
        for name, b in self._backends.items():
            if not b.loaded or b.until_ns is None:
                continue
            upto = b.until_ns - s.seal_margin_ns
            after = b.seal_after or (-(2**62), "")
            with self._db.connect() as conn:
                fresh = sql.seal_candidates(conn, name, after, upto, s.seal_batch)
                held = sql.unsealed_by_id(conn, name, sorted(b.held)) if b.held else []
            if fresh:
                b.seal_after = (fresh[-1].done_ns, fresh[-1].request_id)
            elif after[0] < upto - 1:
                b.seal_after = (upto - 1, "")  # none left below the bound: later scans start there
            b.held = {r.request_id for r in held}  # the others were sealed (by another meter) or are gone
            cands = list({r.request_id: r for r in [*held, *fresh] if r.done_ns < upto}.values())
            if not cands:
                continue
            ok, waiting = self._sealable(b, cands)
            b.held |= waiting
            b.held -= ok
            if not ok:
                continue
            with sql.locked_transaction(self._db, name) as conn:
                sums = sql.energy_sums(conn, sorted(ok))
                done_of = {r.request_id: r.done_ns for r in cands}
                seals = [sql.SealRow(rid, name, done_of[rid], now, *sums.get(rid, (0, 0, 0, 0))) for rid in sorted(ok)]
                sql.insert_seals(conn, seals)
            done_max = max(done_of[rid] for rid in ok)
            b.sealed_done_ns = done_max if b.sealed_done_ns is None else max(b.sealed_done_ns, done_max)
            self._sealed += len(ok)
            report.sealed += len(ok)

    def _sealable(self, b: _Backend, cands: list[sql.SealCandidate]) -> tuple[set[str], set[str]]:
        """Split candidates into those that are final now and those that wait: an epoch that may hold their energy
        is stale, or was computed before their row arrived."""
        s = self.settings
        lo = min(r.released_ns for r in cands)
        hi = max(r.done_ns for r in cands)
        with self._db.connect() as conn:
            reach = 2 * s.epoch_ns + s.lag_ns + s.max_interval_ns  # an overlapping epoch starts no earlier
            epochs = sql.epochs_in(conn, b.spec.name, lo - reach, hi + s.reach_ns)
        starts = [e.epoch_start_ns for e in epochs]
        ends = [e.epoch_end_ns for e in epochs]
        stale_starts = sorted(b.stale)
        ok: set[str] = set()
        waiting: set[str] = set()
        for rid, released, done, ingested in cands:
            first = max(0, bisect_right(ends, released) - 1)
            last = bisect_right(starts, done + s.reach_ns)
            final = True
            for i in range(first, last):
                e = epochs[i]
                span_end = max(e.epoch_end_ns, (e.last_reading_ns or e.epoch_end_ns) - s.min_lag_ns)
                if released < span_end and done >= e.epoch_start_ns - s.reach_ns and e.attributed_at_ns < ingested:
                    final = False
                    break
            if final and stale_starts:
                k = bisect_right(stale_starts, done + s.reach_ns)
                final = not any(b.stale[st] + s.max_interval_ns > released for st in stale_starts[:k])
            (ok if final else waiting).add(rid)
        return ok, waiting

    # -- retention -------------------------------------------------------------------------------------------------

    def _maybe_prune(self, now: int, report: PassReport) -> None:
        s = self.settings
        if s.sample_retention_ns is None or now - self._last_prune_ns < s.prune_interval_ns:
            return
        self._last_prune_ns = now
        cutoff = now - s.sample_retention_ns
        for b in self._backends.values():  # never prune what an unattributed epoch still needs
            if b.until_ns is not None:
                cutoff = min(cutoff, b.until_ns + s.lag_ns - _LOOKBEHIND_NS)
        report.pruned_samples = prune_samples(self._db, cutoff)
        if report.pruned_samples:
            log.info("engine_pruned_samples", rows=report.pruned_samples, older_than_ns=cutoff)
