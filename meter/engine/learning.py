"""What the engine learns about a backend from the epochs it attributes: the calibrated power model and the idle floor.

Kept in memory, per backend (``Learning``). The engine never changes a backend's ``Learning`` before an epoch's
write has committed: a batch of new epochs is computed with a private copy (``copy``) that each epoch feeds in turn
(``learn``: later epochs of the batch use what the earlier ones taught), and the backend adopts that copy once the
batch committed. A write that fails leaves the backend's learning as it was, so an epoch that is redone (another
meter wrote it first) feeds the calibration once, never twice. A recompute learns only this: an epoch the calibrator
pooled is pooled again with its rows as they are now (``relearn``: a late timeline had been missing from it), in
place of what it pooled before; its idle floor comes from what is known plus the epoch's own idle stretches
(``policy``).

Calibration (``meter.engine.calibrate``): the counter lag and the prefill/active power ratio, fitted by least squares
over the counter's own readings (leaving out the intervals near abandoned prefills taken as cut at their leaving, whose
classes are guesses); fed every epoch while it has no fit (warming, or a fit refused), then one epoch per
``calibration_refresh_ns``. When the fit settles or moves, the recent epochs computed under the old model are to be
redone (``learn`` returns them). Whenever the
calibrator has no fit (warming after a start, or a refit refused), the latest settled one is the model (``last_fit``):
this meter's own, or the one a meter stored for the backend (``backend_calibrations``; the engine loads it and stores
each new fit), so a restarted meter, or one that takes a backend over, starts from it rather than from the configured
guess, and a refused refit does not fall back to the guess. A stored fit is only a start: it was measured on whatever
the backend served then (the same GPUs, but maybe another model, another engine version), so figures computed with it
are not sealed; the engine seals a backend's requests at the margin only once this meter's own fit has settled
(``settled_here``), and holds them until then, as with no fit at all. Likewise when the backend is given to another
model of the configuration (a backend belongs to one model, so an epoch's requests for a model its fit never saw mean
other weights on the GPUs): the fit starts over from that epoch and seals wait for it to settle again
(``_notice_another_model``); and when the backend itself says it serves other weights under the same model id
(``meter.weights``, ``_notice_other_weights``).

Idle floor (``idle_power="auto"``, ``meter.engine.idle``): measured over the epoch's reading intervals that no
request came near, pooled with the backend's recent epochs when the epoch has less than ``min_idle_ns`` of them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from meter.attribution import AttributionPolicy, request_phases
from meter.engine.calibrate import ClassTimeline, LagCalibrator, PowerModel
from meter.engine.idle import IdleEstimate, busy_windows, estimate_idle
from meter.engine.readings import EpochReadings
from meter.engine.settings import EngineSettings
from meter.timeline import Timeline

log = structlog.get_logger(__name__)

__all__ = ["Learning"]

_MS = 1_000_000
IDLE_HISTORY_EPOCHS = 60  # idle stretches of this many recent epochs measure the floor when one epoch has too few
RECALIBRATE_EPOCHS = 30  # when the calibration first settles or moves, this many recent epochs are recomputed


@dataclass(slots=True)
class Learning:
    """One backend's learned state."""

    idle_power_w: float | None = None  # the idle floor in use (auto), once measured
    idle_history: deque[IdleEstimate] = field(default_factory=lambda: deque(maxlen=IDLE_HISTORY_EPOCHS))
    calibrator: LagCalibrator | None = None
    calibrated_at_ns: int | None = None  # start of the last epoch fed to the calibrator
    recent: deque[tuple[int, int]] = field(default_factory=lambda: deque(maxlen=RECALIBRATE_EPOCHS))
    last_fit: PowerModel | None = None  # the latest settled fit (this meter's, or stored by one before it)
    settled_here: bool = False  # this meter's own fit has settled since it started: only then are figures final
    served: frozenset[str] = frozenset()  # the model ids of the requests the fit was learned from
    weights: str | None = None  # what the backend said it serves (``meter.weights``) for the epochs learned from

    @property
    def fitted(self) -> PowerModel | None:
        """This meter's own fit, once settled."""
        return self.calibrator.model if self.calibrator is not None else None

    @property
    def model(self) -> PowerModel | None:
        """The model in use: this meter's own fit, else the stored one, else None (the configured guess)."""
        fitted = self.fitted
        return fitted if fitted is not None else self.last_fit

    def copy(self) -> Learning:
        """A private copy to learn into; the original is untouched until the caller adopts the copy."""
        return Learning(
            self.idle_power_w,
            deque(self.idle_history, maxlen=IDLE_HISTORY_EPOCHS),
            self.calibrator.copy() if self.calibrator is not None else None,
            self.calibrated_at_ns,
            deque(self.recent, maxlen=RECALIBRATE_EPOCHS),
            self.last_fit,
            self.settled_here,
            self.served,
            self.weights,
        )

    def policy(self, s: EngineSettings, readings: EpochReadings, working: Sequence[Timeline]) -> AttributionPolicy:
        """The policy for an epoch that is not learned from (a recompute): the current model, and the idle floor
        the epoch's own idle stretches would give with the recent history. Changes nothing."""
        model = self.model if s.calibrate else None
        lag = model.lag_ns if model is not None else s.lag_ns
        idle_w = self._idle_floor(s, readings, working, lag, list(self.idle_history))[0]
        return _policy(s, idle_w, lag, model)

    def learn(
        self,
        s: EngineSettings,
        backend: str,
        start: int,
        end: int,
        readings: EpochReadings,
        working: Sequence[Timeline],
        weights: str | None = None,
    ) -> tuple[AttributionPolicy, dict[int, int]]:
        """Learn from a new epoch [start, end) and return the policy to attribute it with, and the recent epochs
        (start -> end) to redo because the calibration settled or moved. ``weights``: what the backend served by the
        epoch's end (None: not known). Mutates this object: call it on a copy."""
        redo: dict[int, int] = {}
        if s.calibrate:
            self._notice_another_model(backend, start, working)
            self._notice_other_weights(backend, start, weights)
        model = self._calibrate(s, backend, start, readings, working, redo) if s.calibrate else None
        self.recent.append((start, end))
        lag = model.lag_ns if model is not None else s.lag_ns
        idle_w, history = self._idle_floor(s, readings, working, lag, self.idle_history)
        if s.idle_power == "auto":
            self.idle_history = deque(history, maxlen=IDLE_HISTORY_EPOCHS)
            self.idle_power_w = idle_w
        return _policy(s, idle_w, lag, model), redo

    def relearn(
        self, s: EngineSettings, backend: str, start: int, readings: EpochReadings, working: Sequence[Timeline]
    ) -> dict[int, int]:
        """A recomputed epoch [start, ...) that the calibrator pooled is pooled again with its rows as they are now
        (a late timeline had been missing: the busy counter had no request to explain it), replacing what it pooled
        before. Returns the recent epochs to redo if the fit moved. Mutates this object: call it on a copy."""
        redo: dict[int, int] = {}
        if s.calibrate and self.calibrator is not None and self.calibrator.pooled(start):
            self._feed(s, backend, start, readings, working, redo)
        return redo

    def _notice_another_model(self, backend: str, start: int, working: Sequence[Timeline]) -> None:
        """A backend belongs to one model of the configuration, so requests for a model its fit never saw mean the
        backend was given to another model (and its server restarted with other weights): the fit starts over from
        this epoch, and until it settles again nothing is sealed (``settled_here``). The model in use meanwhile
        stays the last fit, for figures that are not final; the epochs before the change are not redone when the
        new fit settles (``recent`` starts over too), since the old fit was right for them."""
        served = frozenset(t.model_id for t in working)
        if not self.served:
            self.served = served
            return
        if served <= self.served:
            return
        log.info("engine_backend_serves_another_model", backend=backend, epoch_start_ns=start,
                 before=sorted(self.served), now=sorted(served - self.served))  # fmt: skip
        self.served = served
        self._start_over()

    def _notice_other_weights(self, backend: str, start: int, weights: str | None) -> None:
        """The backend said it serves other weights than those the fit was learned on (the same model id, another
        model behind it: ``meter.weights``): as with another model, the fit starts over from this epoch and nothing
        is sealed until it settles again."""
        if weights is None:
            return
        if self.weights is None:
            self.weights = weights
            return
        if weights == self.weights:
            return
        log.info("engine_backend_serves_other_weights", backend=backend, epoch_start_ns=start, before=self.weights,
                 now=weights)  # fmt: skip
        self.weights = weights
        self._start_over()

    def _start_over(self) -> None:
        self.calibrator = None
        self.calibrated_at_ns = None
        self.recent.clear()
        self.settled_here = False

    def _calibrate(
        self,
        s: EngineSettings,
        backend: str,
        start: int,
        readings: EpochReadings,
        working: Sequence[Timeline],
        redo: dict[int, int],
    ) -> PowerModel | None:
        """Feeds the calibrator this epoch while it has no fit (warming, or its fit refused: seals wait for one),
        then now and then; returns the model."""
        if self.calibrator is None:
            self.calibrator = LagCalibrator(s.calibration_lags_ns)
        cal = self.calibrator
        due = (
            cal.model is None
            or self.calibrated_at_ns is None
            or start - self.calibrated_at_ns >= s.calibration_refresh_ns
        )
        if due:
            self._feed(s, backend, start, readings, working, redo)
        return self.model

    def _feed(
        self,
        s: EngineSettings,
        backend: str,
        start: int,
        readings: EpochReadings,
        working: Sequence[Timeline],
        redo: dict[int, int],
    ) -> None:
        """Pool the epoch starting at ``start`` (or pool it again) and refit; when the model settles or moves, the
        other recent epochs go to ``redo``."""
        cal = self.calibrator
        if cal is None or not working or not readings.segments:
            return
        # An abandoned prefill's step is placed by the model as any other once it is taken to run its length
        # (``abandoned_step_completes``), unless it is billed at the chance that it began (its client left within the
        # backend's queue waits: it ran whole or not at all); taken as cut at an unknown point, its window's classes
        # are guesses.
        phases = request_phases(list(working), s.policy(None), since_ns=start)
        uncertain = (
            [(p.released_ns, p.done_ns) for p in phases if p.step_share < 1.0]
            if s.abandoned_step_completes
            else [(t.released_ns, t.done_ns) for t in working if t.abandoned_prefill]
        )
        classes = ClassTimeline.from_phases(phases, uncertain)  # type: ignore[arg-type]  # abandoned: released
        before = self.model
        cal.add(readings.segments, classes, self.idle_power_w if s.idle_power == "auto" else None, start_ns=start)
        if self.calibrated_at_ns is None or start > self.calibrated_at_ns:
            self.calibrated_at_ns = start
        m = cal.model
        if m is not None:
            self.last_fit = m
            self.settled_here = True
        if m is not None and (
            before is None
            or abs(before.lag_ns - m.lag_ns) >= 20 * _MS
            or abs(before.prefill_power_ratio / m.prefill_power_ratio - 1) > 0.1
        ):
            # The model settled or moved: the epochs attributed under the old one are redone (exactly, as any
            # recompute), so that a backend's recent history shares one model.
            redo.update((e_start, e_end) for e_start, e_end in self.recent if e_start != start)
            log.info(
                "engine_calibrated",
                backend=backend,
                lag_ms=m.lag_ns / _MS,
                prefill_w=round(m.prefill_w, 1),
                active_w=round(m.active_w, 1),
                idle_w=None if m.idle_w is None else round(m.idle_w, 1),
                intervals=m.intervals,
                recomputing=len(redo),
            )

    def _idle_floor(
        self,
        s: EngineSettings,
        readings: EpochReadings,
        working: Sequence[Timeline],
        lag: int,
        history: Sequence[IdleEstimate],
    ) -> tuple[float | None, list[IdleEstimate]]:
        """The idle floor for an epoch, and the history with its own idle stretches added. Pure."""
        if not isinstance(s.idle_power, str):
            return float(s.idle_power), list(history)
        if s.idle_power == "time":
            return None, list(history)
        busy = busy_windows((t.released_ns, t.done_ns) for t in working)  # type: ignore[misc]
        est = estimate_idle(readings.segments, busy, lag, s.idle_margin_ns)
        pooled = [] if est.duration_ns >= s.min_idle_ns else list(history)  # enough idle time in this epoch alone
        if est.duration_ns > 0:
            pooled.append(est)
        pooled = pooled[-IDLE_HISTORY_EPOCHS:]
        total = IdleEstimate(sum(e.energy_mj for e in pooled), sum(e.duration_ns for e in pooled))
        if total.duration_ns >= s.min_idle_ns and total.power_w is not None:
            return total.power_w, pooled
        return self.idle_power_w, pooled


def _policy(s: EngineSettings, idle_w: float | None, lag: int, model: PowerModel | None) -> AttributionPolicy:
    """The attribution policy of a calibrated model (prefill power at no tokens and per 1,000 step tokens), or the
    configured one."""
    if model is None:
        return s.policy(idle_w, lag)
    return s.policy(idle_w, lag, model.prefill_ratio_at_no_tokens, model.prefill_ratio_per_1k_tokens)
