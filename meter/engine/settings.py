"""What the metering engine is told: the backends it meters and its settings (``meter.engine.core`` says what each
knob does)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from meter.attribution import AttributionPolicy

__all__ = ["LOOKAHEAD_NS", "LOOKBEHIND_NS", "MAX_EPOCH_NS", "EngineSettings", "MeteredBackend"]

_S = 1_000_000_000
_MS = 1_000_000
MAX_EPOCH_NS = 3600 * _S
LOOKBEHIND_NS = 1 * _S  # ticks are regrouped from this far before an epoch, so groups match across epochs
LOOKAHEAD_NS = 1 * _S


@dataclass(frozen=True, slots=True)
class MeteredBackend:
    """A backend whose energy this engine attributes: its name (as in ``requests.backend``) and its devices."""

    name: str
    devices: tuple[str, ...]
    prefill_chunk_tokens: int | None = None  # ``AttributionPolicy.prefill_chunk_tokens`` of its engine

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
    abandoned_step_completes: bool = True  # ``AttributionPolicy.abandoned_step_completes``
    abandoned_step_max_ns: int = 2 * _S  # ``AttributionPolicy.abandoned_step_max_ns``
    prefill_chunk_tokens: int | None = None  # per backend (``MeteredBackend``): ``AttributionPolicy``'s
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
    # While this meter's own fit of a backend has not settled (calibrate on), seal only requests that ended this long
    # before its attribution: a bill is cast with the lag and power ratio fitted on what the backend serves now, not
    # the configured guess nor a fit stored before a restart (maybe of another model on the same GPUs), unless the
    # fit never comes (too little traffic, or traffic too uniform to fit): then the model in use seals, this much later.
    uncalibrated_seal_hold_ns: int = 300 * _S
    # Seal only behind every ledger that said how far it has written within this long (ledger_writers): a replica cut
    # off from the database (its timelines in its journal) holds seals back this long at most; a dead one too.
    writer_timeout_ns: int = 120 * _S
    writer_forget_ns: int = 7 * 86_400 * _S  # a writer silent this long loses its row (a pod that is not coming back)
    # A live writer whose clock is further than this from the meter's (ledger_writers.clock_offset_ns, PostgreSQL) is
    # logged: attribution lines its requests' stamps up with the meter's samples (bench.clock_skew: half the traffic
    # 10 ms off moves a tenant's bill up to ~3.5 %, 25 ms up to ~8 %, 100 ms up to ~18 %).
    clock_skew_warn_ns: int = 10 * _MS
    rollup_interval_ns: int = 60 * _S  # how often hours that became final are rolled up (meter.engine.rollup); an
    # hour becomes final once, so a minute costs reports nothing (they read raw rows for hours not yet rolled up)
    seal_batch: int = 10_000  # requests sealed per backend per pass, at most (a first pass over an old database)

    def __post_init__(self) -> None:
        if not 0 < self.epoch_ns <= MAX_EPOCH_NS:
            raise ValueError(f"epoch_ns must be within (0, 1 h], got {self.epoch_ns}")
        for name in (
            "settle_ns",
            "lag_ns",
            "open_request_timeout_ns",
            "idle_margin_ns",
            "min_idle_ns",
            "uncalibrated_seal_hold_ns",
            "writer_timeout_ns",
            "writer_forget_ns",
            "clock_skew_warn_ns",
        ):
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
        self,
        idle_power_w: float | None,
        lag_ns: int | None = None,
        prefill_power_ratio: float | None = None,
        prefill_ratio_per_1k_tokens: float = 0.0,
    ) -> AttributionPolicy:
        return AttributionPolicy(
            lag_ns=self.lag_ns if lag_ns is None else lag_ns,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            prefill_overhead_ns=self.prefill_overhead_ns,
            prefill_power_ratio=self.prefill_power_ratio if prefill_power_ratio is None else prefill_power_ratio,
            prefill_ratio_per_1k_tokens=prefill_ratio_per_1k_tokens,
            idle_power_w=idle_power_w,
            batch_tolerance_ns=self.batch_tolerance_ns,
            abandoned_step_completes=self.abandoned_step_completes,
            abandoned_step_max_ns=self.abandoned_step_max_ns,
            prefill_chunk_tokens=self.prefill_chunk_tokens,
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
        """How long before an epoch's start a request may have ended and still own some of its energy: a calibrated
        (larger) lag moves the epoch's readings earlier, and an abandoned prefill's step runs past its end."""
        calibrated = max(0, max(self.calibration_lags_ns) - self.lag_ns) if self.calibrate else 0
        abandoned = self.abandoned_step_max_ns if self.abandoned_step_completes else 0  # ``policy().past_done_ns``
        return calibrated + abandoned
