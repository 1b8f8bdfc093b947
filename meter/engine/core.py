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
epoch was computed after the request's row was last written; while calibration is on and this meter's own fit of
the backend has not settled, only requests that ended ``uncalibrated_seal_hold_ns`` before that end (a bill is cast
with the model fitted on what the backend serves now, not the configured guess nor a fit stored before a restart,
unless the fit never comes). The seal (``request_seals``) stores its figures,
the sums of its rows. From then on a recompute (a late row, a calibration move) writes a sealed request's rows back
as they were and re-splits only the others and idle; what the fresh attribution would have given the sealed
requests, less what they hold, is booked to the epoch's ``adjustment_mj``, so that, exactly,
``counter_mj = prefill_mj + decode_mj + idle_mj + adjustment_mj``. Requests are sealed in (done, id) order from a
cursor kept in memory (after a restart, from an hour before the latest seal); late rows found by the scan are held
until their epochs are redone.

Calibration (``calibrate``, on by default; ``meter.engine.calibrate``, ``meter.engine.learning``). The counter lag
and the ratio of prefill to decode power are fitted per backend by least squares over the counter's own readings
(leaving out the intervals near abandoned prefills taken as cut, whose classes are guesses); once the fit settles
(or moves), the backend's recent epochs are recomputed under it: figures not final yet improve, final ones stay (see
Finality).
Epoch boundaries and the readings' partition always use the configured ``lag_ns``; the fitted lag only places the
readings against the timelines inside ``attribute``, so each epoch also looks at requests up to ``reach_ns`` before
its start. Calibration state lives in memory and changes only once an epoch's write committed (a batch learns into a
private copy that the backend adopts after the commit; a failed write teaches nothing). After a restart it is learned
again (a recompute of an old epoch may then use a slightly different model: conservation holds either way, and
final figures stay).

Idle power. With ``idle_power="auto"`` each epoch measures the idle floor over its own reading intervals that no
request came near (``meter.engine.idle``), pooled with those of the backend's recent epochs when it has less than
``min_idle_ns`` of them (in memory: a recompute after a restart may pool fewer), and gives ``attribute`` that
floor: partly idle intervals then book only the floor to idle and the rest to the requests, which matches how a GPU
draws power (and how the simulator's truth splits it). ``"time"`` splits partly idle intervals by time; a number
fixes the floor.

Modules, one job each: ``settings`` (what the engine is told), ``planner`` (which epochs are due, which rows each
needs), ``epoch`` (one epoch's attribution, pure), ``learning`` (calibration and idle floor, per backend),
``recompute`` (which epochs late rows make stale), ``sealing`` (which requests became final), ``writer`` (the
locked write transactions), ``retention`` (which samples may go), ``sql`` (the statements and named rows). This
module reads the database, runs them in order, and keeps the engine's state between passes.
"""

from __future__ import annotations

import enum
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import sqlalchemy as sa
import structlog

from meter.engine import sql
from meter.engine.calibrate import PowerModel
from meter.engine.epoch import EpochResult, compute_epoch, epoch_timelines
from meter.engine.learning import Learning
from meter.engine.planner import due_epochs, split_rows
from meter.engine.readings import EpochReadings, Tick, epoch_bounds, epoch_readings, group_ticks
from meter.engine.recompute import overlap_reach_ns, span_end_ns, stale_epochs
from meter.engine.retention import prune_cutoff_ns
from meter.engine.rollup import Rollup
from meter.engine.sealing import sealable
from meter.engine.settings import LOOKAHEAD_NS, LOOKBEHIND_NS, EngineSettings, MeteredBackend
from meter.engine.writer import replace_epoch, write_new_epochs, write_seals_of, write_unrouted
from meter.store.clock import clock_offset_ns
from meter.store.retention import prune_samples
from meter.timeline import Timeline

log = structlog.get_logger(__name__)

__all__ = ["EngineSettings", "EngineStats", "MeteredBackend", "MeteringEngine", "PassReport"]

_S = 1_000_000_000
_RESTART_LOOKBACK_NS = 60 * _S  # at start, rows written this long before the last attribution are checked again
_SEAL_LOOKBACK_NS = 3600 * _S  # after a restart, unsealed requests are looked for this far before the latest seal


def _merge_by_time(by_device: dict[str, list[sql.SampleRow]], devices: Sequence[str]) -> list[sql.SampleRow]:
    """The samples of several devices (each already sorted by time) in one list sorted by (time, device)."""
    return sorted((x for d in devices for x in by_device.get(d, ())), key=lambda x: (x.t_ns, x.device))


class _CannotRecomputeError(Exception):
    """A stale epoch whose readings are no longer stored."""


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
    rolled_hours: int = 0  # hours rolled up into usage_final_hourly
    reopened_hours: int = 0  # rolled hours that late rows reopened


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
    calibration_intervals: dict[str, int]  # per backend: reading intervals pooled by the calibration


class _Loaded(enum.Enum):
    """Whether a backend's state (how far it is attributed, the seal cursor) was read from the database."""

    STALE = "stale"  # not read yet, or a pass failed: read it again before the next pass
    CURRENT = "current"


@dataclass(slots=True)
class _Backend:
    spec: MeteredBackend
    state: _Loaded = _Loaded.STALE
    until_ns: int | None = None  # end of the last attributed epoch (the next one starts here)
    span_end_ns: int | None = None  # work-time end of the last epoch's readings (>= until_ns)
    learning: Learning = field(default_factory=Learning)
    stale: dict[int, int] = field(default_factory=dict)  # epochs to recompute (start -> end), found by the scan
    timeout_logged_ns: int = 0
    seal_after: tuple[int, str] | None = None  # every request up to this (done_ns, request_id) was looked at
    held: set[str] = field(default_factory=set)  # looked at but not sealable yet (a stale epoch, a late row)
    sealed_done_ns: int | None = None  # the latest done_ns of a request sealed so far (None: nothing sealed)
    stored_model: PowerModel | None = None  # the fit in backend_calibrations, as far as this meter knows


@dataclass(frozen=True, slots=True)
class _Computed:
    """A new epoch computed for a batch: its result, and the backend's learning after it (adopted on commit)."""

    backend: _Backend
    result: EpochResult
    learned: Learning
    redo: dict[int, int]  # epochs to recompute because the calibration settled or moved


class MeteringEngine:
    """Attributes the energy of ``backends`` epoch by epoch. Not thread-safe: one thread calls ``run_once``."""

    def __init__(
        self,
        db: sa.Engine,
        backends: Sequence[MeteredBackend],
        settings: EngineSettings | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        weights: Callable[[str, int], str | None] | None = None,
    ) -> None:
        """``weights(backend, t_ns)``: what the backend served at t_ns, None if not known (``meter.weights``)."""
        self._db = db
        self.settings = settings or EngineSettings()
        self._clock = clock
        self._weights = weights or (lambda _backend, _t_ns: None)
        self._backends: dict[str, _Backend] = {}
        self.set_backends(backends)
        self._scan_lo_ns: int | None = None
        self._last_prune_ns = 0
        self._rollup = Rollup()
        self._last_rollup_ns: int | None = None
        self._passes = 0
        self._epochs = 0
        self._recomputed = 0
        self._rows = 0
        self._sealed = 0
        self._adjustment_mj = 0
        self._adjusted_epochs = 0
        self._unrouted = 0
        self._errors = 0
        self._last_error: str | None = None
        self._through_ns: int | None = None  # ledger_writers' lowest mark, read at the start of the pass
        self._silent_writers: set[str] = set()  # writers past writer_timeout_ns at the last pass (logged once)
        self._skewed_writers: set[str] = set()  # live writers whose clocks were off this meter's (logged once)

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
        bs = self._backends
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
            attributed_until_ns={n: b.until_ns if b.state is _Loaded.CURRENT else None for n, b in bs.items()},
            idle_power_w={n: b.learning.idle_power_w for n, b in bs.items()},
            calibration={n: b.learning.model for n, b in bs.items()},
            calibration_intervals={
                n: b.learning.calibrator.intervals if b.learning.calibrator else 0 for n, b in bs.items()
            },
        )

    # -- the pass --------------------------------------------------------------------------------------------------

    def _settings_of(self, b: _Backend) -> EngineSettings:
        """The settings a backend's epochs are attributed with: the engine's, with its engine's prefill chunk."""
        chunk = b.spec.prefill_chunk_tokens
        return self.settings if chunk is None else replace(self.settings, prefill_chunk_tokens=chunk)

    def run_once(self, now_ns: int | None = None) -> PassReport:
        """Recompute stale epochs, attribute every epoch that is due, count new unrouted requests, seal, prune.
        ``now_ns``: the time of the pass (the engine's clock when None); the whole pass sees that one time.

        Raises on database errors (nothing is half written: a recompute, or the batch of new epochs, is one
        transaction); the caller retries on its next pass, which starts again from what the database holds.
        """
        now = self._clock() if now_ns is None else now_ns
        report = PassReport()
        # The pass allocates hundreds of thousands of small objects (rows, timelines, shares) that live until it
        # ends and form no reference cycles: the cyclic collector would scan them again and again (a fifth of the
        # pass's CPU, measured). It is paused for the pass and resumed after; reference counting frees everything
        # as usual meanwhile, and cycles made elsewhere in the process meanwhile are collected once it resumes.
        collecting = gc.isenabled()
        if collecting:
            gc.disable()
        try:
            self._load()
            self._through_ns = self._writers_through(now)
            self._scan_ingested(now, report)
            plan = self._plan(now, self._open_requests(now))
            if plan:
                self._attribute_planned(plan, now, report)
            self._seal(now, report)
            self._maybe_roll_up(now, report)
            self._maybe_prune(now, report)
        except Exception as exc:
            self._errors += 1
            self._last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            for b in self._backends.values():
                b.state = _Loaded.STALE  # re-read the state from the database next time
            raise
        finally:
            if collecting:
                gc.enable()
            self._passes += 1
        return report

    def _load(self) -> None:
        todo = [b for b in self._backends.values() if b.state is _Loaded.STALE]
        if not todo:
            return
        with self._db.connect() as conn:
            for b in todo:
                b.sealed_done_ns = sql.last_sealed_done(conn, b.spec.name)
                # Requests are sealed in (done_ns, id) order; after a restart look again from a while before the
                # latest seal, for requests that were held back (a stale epoch) when the last run stopped.
                b.seal_after = None if b.sealed_done_ns is None else (b.sealed_done_ns - _SEAL_LOOKBACK_NS, "")
                b.held.clear()
                if self.settings.calibrate and b.learning.model is None:  # a fresh start: begin from the stored fit
                    b.stored_model = b.learning.last_fit = sql.stored_calibration(conn, b.spec.name, b.spec.devices)
                last = sql.last_epoch(conn, b.spec.name)
                if last is None:
                    b.until_ns = b.span_end_ns = None
                else:
                    b.until_ns = last.epoch_end_ns
                    b.span_end_ns = span_end_ns(self.settings, last)
                    lo = last.attributed_at_ns - _RESTART_LOOKBACK_NS  # a row the last run found but did not redo
                    if self._scan_lo_ns is None or lo < self._scan_lo_ns:
                        self._scan_lo_ns = lo
                b.state = _Loaded.CURRENT
        if self._scan_lo_ns is None:
            self._scan_lo_ns = 0  # nothing attributed yet: look at every row once

    # -- open requests ---------------------------------------------------------------------------------------------

    def _open_requests(self, now: int) -> dict[str, int]:
        """Per backend, the earliest release of an open request that still holds attribution back."""
        cutoff = now - self.settings.open_request_timeout_ns
        with self._db.connect() as conn:
            rows = sql.open_requests(conn, list(self._backends), cutoff)
        out: dict[str, int] = {}
        for r in rows:
            if r.earliest_released_ns is not None:
                out[r.backend] = int(r.earliest_released_ns)
            b = self._backends[r.backend]
            if r.timed_out and now - b.timeout_logged_ns >= 60 * _S:
                b.timeout_logged_ns = now
                log.warning(
                    "engine_open_requests_timed_out",
                    backend=r.backend,
                    requests=int(r.timed_out),
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
            epochs = due_epochs(s, b.until_ns, [t for t in lasts if t is not None], now, open_since.get(name))
            if epochs:
                plan[name] = epochs
        return plan

    def _attribute_planned(self, plan: dict[str, list[tuple[int, int]]], now: int, report: PassReport) -> None:
        """Attribute every planned (new) epoch with bulk reads and ONE write transaction for all of them."""
        s = self.settings
        attributed_at = now - s.commit_margin_ns
        starts = [e[0] for eps in plan.values() for e in eps]
        ends = [e[1] for eps in plan.values() for e in eps]
        devices = sorted({d for name in plan for d in self._backends[name].spec.devices})
        with self._db.connect() as conn:
            samples = sql.samples_between(
                conn, devices, min(starts) + s.lag_ns - LOOKBEHIND_NS, max(ends) + s.lag_ns + LOOKAHEAD_NS
            )
            by_device: dict[str, list[sql.SampleRow]] = {}
            for x in samples:
                by_device.setdefault(x.device, []).append(x)
            ready: dict[str, list[tuple[int, int, EpochReadings]]] = {}
            for name, planned in plan.items():
                b = self._backends[name]
                own = b.spec.devices
                samples_of = by_device.get(own[0], []) if len(own) == 1 else _merge_by_time(by_device, own)
                ticks = group_ticks(samples_of, own, s.tick_gap_ns)
                for start, end in planned:
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
        computed: list[_Computed] = []
        maybe_sealed: list[str] = []  # ids that ended before the latest sealed request of their backend
        for name, epochs in ready.items():
            b = self._backends[name]
            b_settings = self._settings_of(b)
            learned = b.learning.copy()  # the batch learns into a copy; the backend adopts it once the write committed
            redo: dict[int, int] = {}
            memo: dict[str, Timeline | None] = {}  # one read of rows: a request over several epochs is built once
            for (start, end, readings), mine in zip(
                epochs, split_rows(s, epochs, by_backend.get(name, [])), strict=True
            ):
                if any(r.ingested_ns > attributed_at for r in mine):
                    break  # a row is still fresh: this epoch and the later ones wait for a later pass
                working = epoch_timelines(name, mine, memo)
                policy, moved = learned.learn(
                    b_settings, name, start, end, readings, working, self._weights(name, end - 1)
                )
                redo.update(moved)
                result = compute_epoch(name, start, end, readings, mine, working, policy, attributed_at)
                computed.append(_Computed(b, result, learned, dict(redo)))
                if b.sealed_done_ns is not None:
                    maybe_sealed += [r.request_id for r in mine if r.done_ns <= b.sealed_done_ns]
        if not computed:
            return
        try:
            finals = write_new_epochs(self._db, list(ready), [c.result for c in computed], maybe_sealed)
        except sa.exc.IntegrityError:
            # Another meter wrote one of these epochs first: redo them one by one (each replaces what is there). The
            # batch taught nothing: each epoch learns once, when its own write commits.
            log.warning("engine_batch_conflict", epochs=len(computed), detail="retrying epoch by epoch")
            for c in computed:
                r = c.result
                if self._attribute(c.backend, r.start, r.end, now, report, existing=False) is None:
                    break
                report.attributed.append((c.backend.spec.name, r.start))
            return
        for c in computed:  # committed: each backend adopts what its last epoch of the batch learned
            c.backend.learning = c.learned
            c.backend.stale.update(c.redo)
        self._store_fits([c.backend for c in computed], now)
        for c, final in zip(computed, finals, strict=True):
            r = c.result
            self._advanced(c.backend, r.end, r.readings)
            self._epochs += 1
            self._rows += len(final.request_rows)
            self._booked(c.backend.spec.name, r.start, final.adjustment_mj, report)
            report.attributed.append((c.backend.spec.name, r.start))
            report.requests_attributed += len(final.request_rows)

    def _store_fits(self, backends: Sequence[_Backend], now: int) -> None:
        """Store each backend's own fit that is new since it was last stored (``backend_calibrations``). A failed
        write is logged and retried with the next fit: the stored fit only spares a restarted meter the guess."""
        fresh = {b.spec.name: (b, b.learning.fitted) for b in backends}
        todo = [(b, m) for b, m in fresh.values() if m is not None and m != b.stored_model]
        if not todo:
            return
        try:
            with self._db.begin() as conn:
                for b, m in todo:
                    sql.store_calibration(conn, b.spec.name, b.spec.devices, m, now)
        except sa.exc.SQLAlchemyError as exc:
            log.warning("engine_calibration_not_stored", error=str(exc).splitlines()[0][:300])
            return
        for b, m in todo:
            b.stored_model = m

    def _readings(self, ticks: list[Tick], start: int, end: int) -> EpochReadings | None:
        s = self.settings
        return epoch_readings(ticks, start, end, s.lag_ns, s.max_interval_ns, drop_stale=s.drop_stale_readings)

    def _advanced(self, b: _Backend, end: int, readings: EpochReadings) -> None:
        s = self.settings
        b.until_ns = max(end, b.until_ns or end)
        span_end = max(end, (readings.last_reading_ns or end) - s.min_lag_ns)
        b.span_end_ns = max(span_end, b.span_end_ns or span_end)

    # -- stale epochs ----------------------------------------------------------------------------------------------

    def _writers_through(self, now: int) -> int | None:
        """How far every ledger heard from within ``writer_timeout_ns`` has written (``ledger_writers``; None: no
        such writer). Read before the pass scans for late rows, so that every row written before the mark is seen
        by this pass's scan, and its epochs redone before ``_seal`` looks at them. A writer that falls silent is
        logged once: from then on what it brings is booked as the epochs' adjustment. One silent past
        ``writer_forget_ns`` loses its row (it writes a new one if it ever comes back)."""
        with self._db.connect() as conn:
            marks = sql.writer_marks(conn)
            own_offset_ns = clock_offset_ns(conn)
        forget_before = now - self.settings.writer_forget_ns
        gone = [m for m in marks if m.through_ns < forget_before]
        if gone:  # a pod killed and never restarted on its journal: its row would stay, silent, for ever
            with self._db.begin() as conn:
                sql.forget_writers(conn, [m.writer_id for m in gone], forget_before)
            log.info(
                "engine_writers_forgotten",
                writers=sorted(m.writer_id for m in gone),
                silent_over_s=self.settings.writer_forget_ns // _S,
            )
            marks = [m for m in marks if m.through_ns >= forget_before]
        heard_since = now - self.settings.writer_timeout_ns
        silent = {m.writer_id for m in marks if m.through_ns < heard_since}
        self._check_clocks([m for m in marks if m.writer_id not in silent], own_offset_ns)
        for m in marks:
            if m.writer_id in silent and m.writer_id not in self._silent_writers:
                log.warning(
                    "engine_writer_silent",
                    writer=m.writer_id,
                    name=m.name,
                    silent_s=round((now - m.through_ns) / 1e9),
                    detail="no longer holds seals back: records it writes later are booked as the epochs' adjustment",
                )
        self._silent_writers = silent
        return min((m.through_ns for m in marks if m.writer_id not in silent), default=None)

    def _check_clocks(self, live: list[sql.WriterMark], own_offset_ns: int | None) -> None:
        """Log once each live writer whose clock is more than ``clock_skew_warn_ns`` off this meter's (both measured
        against the database server's): its requests' stamps and this meter's samples do not line up, so their
        energy goes partly to the neighbours of the same epochs. Logged again if it comes back and drifts off anew."""
        if own_offset_ns is None:
            return
        bound = self.settings.clock_skew_warn_ns
        skewed: set[str] = set()
        for m in live:
            if m.clock_offset_ns is None or abs(m.clock_offset_ns - own_offset_ns) <= bound:
                continue
            skewed.add(m.writer_id)
            if m.writer_id not in self._skewed_writers:
                log.warning(
                    "engine_writer_clock_skewed",
                    writer=m.writer_id,
                    name=m.name,
                    skew_ms=round((m.clock_offset_ns - own_offset_ns) / 1e6, 1),
                    bound_ms=bound / 1e6,
                    detail="its requests' times and this meter's samples disagree: fix the host's clock (NTP)",
                )
        self._skewed_writers = skewed

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
                    done = self._attribute(b, start, b.stale[start], now, report, existing=True)
                except _CannotRecomputeError:
                    del b.stale[start]
                    continue
                if done is not None:
                    del b.stale[start]
                    report.recomputed.append((name, start))
        if unrouted:
            n = write_unrouted(self._db, unrouted, s.epoch_ns)
            self._unrouted += n
            report.unrouted_counted += n

    def _stale_epochs(self, backend: str, rows: list[sql.IngestedRow]) -> dict[int, int]:
        """The attributed epochs (start -> end) of ``backend`` that one of ``rows`` overlaps and is newer than."""
        s = self.settings
        min_released = min(r.released_ns for r in rows if r.released_ns is not None)
        max_done = max(r.done_ns for r in rows if r.done_ns is not None)
        with self._db.connect() as conn:
            epochs = sql.epochs_in(conn, backend, min_released - overlap_reach_ns(s), max_done + s.reach_ns)
        stale = stale_epochs(s, epochs, rows)
        if stale:
            log.info("engine_late_rows", backend=backend, rows=len(rows), stale_epochs=len(stale))
        return stale

    # -- one epoch -------------------------------------------------------------------------------------------------

    def _ticks(self, conn: sa.Connection, devices: tuple[str, ...], start: int, end: int) -> list[Tick]:
        """The ticks from a second before the epoch to a second past its boundary tick."""
        s = self.settings
        lo = start + s.lag_ns - LOOKBEHIND_NS
        hi = end + s.lag_ns + LOOKAHEAD_NS
        ticks = group_ticks(sql.samples_between(conn, devices, lo, hi), devices, s.tick_gap_ns)
        if len(ticks) >= 2 and ticks[-2].t_ns >= end + s.lag_ns:  # the boundary tick is complete
            return ticks
        nxt = sql.first_sample_at_or_after(conn, devices, end + s.lag_ns)
        if nxt is None or nxt + LOOKAHEAD_NS <= hi:
            return ticks
        return group_ticks(sql.samples_between(conn, devices, lo, nxt + LOOKAHEAD_NS), devices, s.tick_gap_ns)

    def _attribute(
        self, b: _Backend, start: int, end: int, now: int, report: PassReport, *, existing: bool
    ) -> int | None:
        """Attribute (or, ``existing``, recompute) epoch [start, end) of ``b`` in a transaction of its own; returns
        the request rows written, None if its readings are not complete. A new epoch learns once its write
        committed; a recompute learns nothing."""
        s = self.settings
        name = b.spec.name
        attributed_at = now - s.commit_margin_ns
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
        working = epoch_timelines(name, rows)
        learned = b.learning.copy()  # adopted once the write committed
        b_settings = self._settings_of(b)
        if existing:
            redo = learned.relearn(b_settings, name, start, readings, working)
            policy = learned.policy(b_settings, readings, working)
        else:
            policy, redo = learned.learn(b_settings, name, start, end, readings, working, self._weights(name, end - 1))
        result = compute_epoch(name, start, end, readings, rows, working, policy, attributed_at)
        try:
            final = replace_epoch(self._db, result)
        except sa.exc.IntegrityError:
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
            working = [t for t in working if t.request_id not in excluded]
            final = replace_epoch(
                self._db, compute_epoch(name, start, end, readings, kept, working, policy, attributed_at)
            )
        b.learning = learned
        b.stale.update(redo)
        self._store_fits([b], now)
        if not existing or end == b.until_ns:  # a recompute never moves "attributed until"; it may move the span
            self._advanced(b, end, readings)
        if existing:
            self._recomputed += 1
        else:
            self._epochs += 1
        self._booked(name, start, final.adjustment_mj, report)
        self._rows += len(final.request_rows)
        return len(final.request_rows)

    def _booked(self, name: str, start: int, adjustment_mj: int, report: PassReport) -> None:
        if adjustment_mj:
            self._adjustment_mj += adjustment_mj
            self._adjusted_epochs += 1
            report.adjustment_mj += adjustment_mj
            log.info(
                "engine_sealed_requests_adjustment",
                backend=name,
                epoch_start_ns=start,
                adjustment_mj=adjustment_mj,
                detail="a recompute left sealed requests as they were; the difference is booked to the epoch",
            )

    # -- sealing ---------------------------------------------------------------------------------------------------

    def _seal(self, now: int, report: PassReport) -> None:
        """Seal every request that became final (``meter.engine.sealing``). Its figures (sums of its rows, idle
        shares included) go to ``request_seals``; from then on a recompute keeps its rows as they are
        (``EpochResult.finish``)."""
        s = self.settings
        todo: dict[str, dict[str, int]] = {}  # backend -> id -> done_ns, sealed in one transaction below
        with self._db.connect() as conn:  # one connection for every backend's reads (each checkout costs a round trip)
            for name, b in self._backends.items():
                if b.state is not _Loaded.CURRENT or b.until_ns is None:
                    continue
                upto = b.until_ns - s.seal_margin_ns
                if s.calibrate and not b.learning.settled_here:  # neither the guess nor a stored fit casts a bill
                    upto = min(upto, b.until_ns - s.uncalibrated_seal_hold_ns)
                if self._through_ns is not None:  # every epoch a candidate's energy may be in ends within the marks
                    upto = min(upto, self._through_ns - self._through_ns % s.epoch_ns - s.reach_ns)
                after = b.seal_after or (-(2**62), "")
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
                lo = min(r.released_ns for r in cands)
                hi = max(r.done_ns for r in cands)
                epochs = sql.epochs_in(conn, name, lo - overlap_reach_ns(s), hi + s.reach_ns)
                ok, waiting = sealable(s, cands, epochs, b.stale)
                b.held |= waiting
                b.held -= ok
                if ok:
                    todo[name] = {r.request_id: r.done_ns for r in cands if r.request_id in ok}
        if not todo:
            return
        write_seals_of(self._db, todo, now)
        for name, done_of in todo.items():
            b = self._backends[name]
            done_max = max(done_of.values())
            b.sealed_done_ns = done_max if b.sealed_done_ns is None else max(b.sealed_done_ns, done_max)
            self._sealed += len(done_of)
            report.sealed += len(done_of)

    # -- rollup ----------------------------------------------------------------------------------------------------

    def _maybe_roll_up(self, now: int, report: PassReport) -> None:
        s = self.settings
        if self._last_rollup_ns is not None and now - self._last_rollup_ns < s.rollup_interval_ns:
            return
        self._last_rollup_ns = now
        done = self._rollup.run(self._db, now, now - s.scan_margin_ns)
        report.rolled_hours, report.reopened_hours = done.rolled_hours, done.reopened_hours

    # -- retention -------------------------------------------------------------------------------------------------

    def _maybe_prune(self, now: int, report: PassReport) -> None:
        s = self.settings
        if now - self._last_prune_ns < s.prune_interval_ns:
            return
        cutoff = prune_cutoff_ns(s, now, (b.until_ns for b in self._backends.values()))
        if cutoff is None:
            return
        self._last_prune_ns = now
        report.pruned_samples = prune_samples(self._db, cutoff)
        if report.pruned_samples:
            log.info("engine_pruned_samples", rows=report.pruned_samples, older_than_ns=cutoff)
