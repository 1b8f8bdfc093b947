"""The metering engine: stored counter samples x request timelines -> per-request, per-phase millijoules in SQL.

``MeteringEngine.run_once`` does one incremental pass (see ``meter.engine.core`` for the design: epochs, horizon,
gaps, late data); ``meter.service.MeterService`` runs it in a loop next to the sampler. ``attributed_until`` and
``request_finality`` tell readers whether a request's energy is final; ``expected_usage`` recomputes the hourly
rollup from scratch by the engine's own rule.
"""

from meter.engine.calibrate import PowerModel
from meter.engine.core import EngineStats, MeteringEngine, PassReport
from meter.engine.finality import attributed_until, request_finality
from meter.engine.readings import EpochReadings, Tick, epoch_bounds, epoch_readings, group_ticks
from meter.engine.settings import EngineSettings, MeteredBackend
from meter.engine.usage import HOUR_NS, expected_usage, hour_of, usage_table

__all__ = [
    "HOUR_NS",
    "EngineSettings",
    "EngineStats",
    "EpochReadings",
    "MeteredBackend",
    "MeteringEngine",
    "PassReport",
    "PowerModel",
    "Tick",
    "attributed_until",
    "epoch_bounds",
    "epoch_readings",
    "expected_usage",
    "group_ticks",
    "hour_of",
    "request_finality",
    "usage_table",
]
