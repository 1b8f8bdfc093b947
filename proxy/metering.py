"""The meter of this node, assembled from the configuration: engine settings, the node's backends, the service.

Used by ``joulegate serve --meter nvml|sim`` (in the gateway process) and by the ``joulegate meter`` daemon.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import structlog

from proxy.config import Config, ConfigError, MeterConfig

log = structlog.get_logger(__name__)

if TYPE_CHECKING:
    import sqlalchemy as sa

    from meter.engine import EngineSettings
    from meter.service import BackendSpec, MeterService, SampleSink

_S = 1_000_000_000
_MS = 1_000_000


def engine_settings(meter: MeterConfig) -> EngineSettings:
    """The engine's settings from the ``[meter]`` section."""
    from meter.engine import EngineSettings

    return EngineSettings(
        epoch_ns=round(meter.epoch_s * _S),
        settle_ns=round(meter.settle_s * _S),
        lag_ns=meter.lag_ms * _MS,
        open_request_timeout_ns=round(meter.open_request_timeout_s * _S),
        prefill_tokens_per_s=meter.prefill_tokens_per_s,
        prefill_overhead_ns=round(meter.prefill_overhead_ms * _MS),
        prefill_power_ratio=meter.prefill_power_ratio,
        batch_tolerance_ns=round(meter.batch_tolerance_ms * _MS),
        idle_power=meter.idle_power_w,
        tick_gap_ns=min(40 * _MS, meter.interval_ms * _MS // 2),
        max_interval_ns=max(round(meter.max_interval_s * _S), 2 * meter.interval_ms * _MS),
        sample_retention_ns=round(meter.sample_retention_days * 86_400 * _S),
        count_unrouted=meter.count_unrouted,
        calibrate=meter.calibrate,
    )


def node_name(meter: MeterConfig) -> str:
    return meter.node or socket.gethostname()


def local_backends(config: Config) -> list[BackendSpec]:
    """The backends whose energy this node's meter attributes: ``node`` empty or this node's name."""
    from meter.service import BackendSpec

    node = node_name(config.meter)
    return [BackendSpec(b.name, b.url, b.gpus) for b in config.backends if b.node in ("", node)]


def build_meter_service(config: Config, db: sa.Engine, ledger: SampleSink) -> MeterService | None:
    """The meter service of this node for ``config`` (not started), or None when ``meter.source = "auto"`` finds no
    NVML energy counter here. Blocking: it opens the source and reads it."""
    from meter.sources.nvml import NvmlSource, NvmlUnavailableError

    source = config.meter.source
    if source == "none":
        raise ConfigError("meter.source is 'none': nothing to meter")
    if source == "auto":
        try:
            NvmlSource().close()  # is there a driver with energy counters here at all?
        except NvmlUnavailableError as exc:
            log.info("meter_off", reason=f"meter.source is auto and NVML is not usable here: {exc}")
            return None
        source = "nvml"  # a GPU host: configuration errors from here on are reported, not skipped
    from meter.service import build_meter_service as build

    return build(
        source,
        local_backends(config),
        db,
        ledger,
        engine_settings(config.meter),
        interval_ms=config.meter.interval_ms,
        engine_interval_s=config.meter.engine_interval_s,
    )
