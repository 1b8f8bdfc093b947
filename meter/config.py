"""The ``[meter]`` section: sampler, ledger journal, and the knobs of the metering engine, in the units an operator
writes (seconds, milliseconds, days, watts).

One source of truth: the engine's defaults are ``meter.engine.EngineSettings``'s (in nanoseconds); this section
shows them in its own units and ``engine_settings`` turns a section back into ``EngineSettings``. A knob the engine
has and this section leaves out keeps the engine's default. What each knob means: ``meter.engine``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from common.config import LISTEN_HELP, Section, listener
from meter.engine import EngineSettings
from meter.reports.settings import BillingSettings
from meter.reports.types import IdlePolicy
from meter.sampler import INTERVAL_MS
from meter.service import ENGINE_INTERVAL_S

_S = 1_000_000_000
_MS = 1_000_000
_DAY_S = 86_400
_ENGINE = EngineSettings()  # the defaults


class MeterConfig(Section):
    """The meter: sampler, ledger journal, and the metering engine (meter/engine) that turns samples and timelines
    into per-request joules."""

    # auto: NVML when this host's driver exposes the GPUs' energy counters, else no meter (logged); the default, so a
    # single GPU box meters with no configuration
    source: Literal["auto", "nvml", "sim", "none"] = "auto"
    interval_ms: int = Field(default=INTERVAL_MS, ge=10, le=10_000)
    counter_every: int = Field(
        default=1,
        ge=1,
        le=100,
        description="NVML: read the energy counter every this many reads and the instant power on every one, the "
        "energy between spread by power (a node of 8 GPUs: 10 takes reads from ~30 % of a core to ~3 %)",
    )
    lag_ms: int = Field(
        default=_ENGINE.lag_ns // _MS, ge=0, le=2_000, description="counter lag behind the work it measures"
    )
    idle_policy: IdlePolicy = BillingSettings().idle_policy
    sample_retention_days: float = Field(default=(_ENGINE.sample_retention_ns or 0) / _S / _DAY_S, gt=0)
    # the ledger's write-ahead journal (meter.journal: <path>.<n> segments, <path>.rejected, <path>.lock); "": beside
    # a SQLite file given by an absolute path, else $XDG_STATE_HOME/joulegate/journal-<hash of the database>.jsonl
    journal_path: str = ""
    node: str = ""  # this host's name, matched against backends' `node` (default: the hostname)
    # -- the metering engine --
    epoch_s: float = Field(
        default=_ENGINE.epoch_ns / _S, ge=0.1, le=3600, description="attribution epoch (wall-clock window)"
    )
    settle_s: float = Field(
        default=_ENGINE.settle_ns / _S, ge=0, le=600, description="wait past an epoch's end for late timelines"
    )
    open_request_timeout_s: float = Field(
        default=_ENGINE.open_request_timeout_ns / _S,
        gt=0,
        description="an open request older than this no longer holds attribution back",
    )
    engine_interval_s: float = Field(
        default=ENGINE_INTERVAL_S, gt=0, le=60, description="how often the engine runs a pass"
    )
    prefill_tokens_per_s: float = Field(
        default=_ENGINE.prefill_tokens_per_s, gt=0, description="to estimate a prefill step's length"
    )
    prefill_overhead_ms: float = Field(default=_ENGINE.prefill_overhead_ns / _MS, ge=0, le=10_000)
    prefill_power_ratio: float = Field(
        default=_ENGINE.prefill_power_ratio, gt=0, le=100, description="prefill power / decode power, until calibrated"
    )
    batch_tolerance_ms: float = Field(
        default=_ENGINE.batch_tolerance_ns / _MS, ge=0, le=1_000, description="first tokens this close: one prefill"
    )
    abandoned_step_completes: bool = Field(
        default=_ENGINE.abandoned_step_completes,
        description="a client that leaves mid-prefill owns the whole step (engines finish a forward pass they began)",
    )
    abandoned_step_max_s: float = Field(
        default=_ENGINE.abandoned_step_max_ns / _S,
        ge=0,
        le=60,
        description="how long such a step may run past the leaving (bills wait this much longer to become final)",
    )
    idle_power_w: float | Literal["auto", "time"] = Field(
        default=_ENGINE.idle_power,
        description="idle floor: 'auto' (measured), 'time' (split partly idle intervals by time), W",
    )
    max_interval_s: float = Field(
        default=_ENGINE.max_interval_ns / _S, gt=0, le=3600, description="a longer reading interval is a gap"
    )
    count_unrouted: bool = Field(
        default=_ENGINE.count_unrouted, description="count requests that never reached a backend in usage"
    )
    calibrate: bool = Field(
        default=_ENGINE.calibrate,
        description="fit the lag and the prefill/decode power ratio to the counter (meter.engine.calibrate)",
    )
    uncalibrated_seal_hold_s: float = Field(
        default=_ENGINE.uncalibrated_seal_hold_ns / _S,
        ge=0,
        le=86_400,
        description="until this meter's own calibration of a backend settles, seal only requests this much older",
    )
    writer_timeout_s: float = Field(
        default=_ENGINE.writer_timeout_ns / _S,
        ge=0,
        le=86_400,
        description="seal only behind every ledger (gateway or meter) that said how far it has written within this "
        "long: a replica cut off from the database holds seals back this long at most",
    )
    clock_skew_warn_ms: float = Field(
        default=_ENGINE.clock_skew_warn_ns / 1e6,
        ge=0,
        le=60_000,
        description="log a gateway or meter whose clock is further than this from this meter's (both measured "
        "against the PostgreSQL server's clock): attribution lines their times up",
    )
    grpc_listen: str | None = Field(
        default="0.0.0.0:8034",
        description=f"`joulegate meter` only: EnergyReports, health and reflection; {LISTEN_HELP}",
    )

    @field_validator("grpc_listen")
    @classmethod
    def _v_grpc(cls, v: str | None) -> str | None:
        return listener(v)

    @field_validator("idle_power_w")
    @classmethod
    def _v_idle_power(cls, v: float | str) -> float | str:
        if not isinstance(v, str) and not 0 <= v < 100_000:
            raise ValueError(f"expected 'auto', 'time' or watts >= 0, got {v!r}")
        return v


def engine_settings(meter: MeterConfig) -> EngineSettings:
    """The engine's settings from the ``[meter]`` section (the knobs it leaves out keep the engine's defaults)."""
    return replace(
        _ENGINE,
        epoch_ns=round(meter.epoch_s * _S),
        settle_ns=round(meter.settle_s * _S),
        lag_ns=meter.lag_ms * _MS,
        open_request_timeout_ns=round(meter.open_request_timeout_s * _S),
        prefill_tokens_per_s=meter.prefill_tokens_per_s,
        prefill_overhead_ns=round(meter.prefill_overhead_ms * _MS),
        prefill_power_ratio=meter.prefill_power_ratio,
        batch_tolerance_ns=round(meter.batch_tolerance_ms * _MS),
        abandoned_step_completes=meter.abandoned_step_completes,
        abandoned_step_max_ns=round(meter.abandoned_step_max_s * _S),
        idle_power=meter.idle_power_w,
        tick_gap_ns=min(_ENGINE.tick_gap_ns, meter.interval_ms * _MS // 2),
        max_interval_ns=max(round(meter.max_interval_s * _S), 2 * meter.interval_ms * _MS),
        sample_retention_ns=round(meter.sample_retention_days * _DAY_S * _S),
        count_unrouted=meter.count_unrouted,
        calibrate=meter.calibrate,
        uncalibrated_seal_hold_ns=round(meter.uncalibrated_seal_hold_s * _S),
        writer_timeout_ns=round(meter.writer_timeout_s * _S),
        clock_skew_warn_ns=round(meter.clock_skew_warn_ms * 1e6),
    )
