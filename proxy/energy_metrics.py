"""Energy on ``/metrics``: attributed joules per tenant, model and phase, and GPU power per backend.

Joules come from SQL (the ``usage_hourly`` rollups the metering engine keeps exact), so every gateway replica of a
fleet reports the fleet's figures, whichever node metered them. The query runs at most once per ``refresh_s`` and on
a worker thread: a scrape never waits on the database longer than it takes to answer from the cache. The figures
are attributed energy so far — they grow as epochs are attributed, and may step down by a few millijoules when a
late timeline makes the engine recompute an epoch (rare; Prometheus' ``increase`` tolerates it as a reset).

Power is the in-process meter's latest reading per backend (absent when this gateway runs without a meter), and so
is the calibration: whether the meter attributes a backend with a fitted model (its own, or the one stored by a meter
before it) or still with the configured guess, in which case its requests' figures are not sealed final until the
fit settles or ``uncalibrated_seal_hold_s`` passes; with the fitted counter lag and prefill/decode power ratio.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import sqlalchemy as sa
import structlog
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from meter.engine import PowerModel
from proxy.metrics import MAX_TENANT_LABELS, REGISTRY

log = structlog.get_logger(__name__)

_MARKS_SQL = sa.text("SELECT through_ns, clock_offset_ns FROM ledger_writers")
_ENERGY_SQL = sa.text(
    "SELECT tenant, model_id, SUM(prefill_mj) AS prefill_mj, SUM(decode_mj) AS decode_mj "
    "FROM usage_hourly GROUP BY tenant, model_id"
)


class EnergyCollector(Collector):
    """Registered once per process; a gateway ``attach``es its database and meter while it runs.

    (One collector for the process, not one per gateway: two gateways in one process — tests, or a restart in
    place — would otherwise register the same metric names twice.)
    """

    def __init__(self, *, refresh_s: float = 10.0) -> None:
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._engine: sa.Engine | None = None
        self._power_w: Callable[[], dict[str, float | None]] | None = None
        self._calibration: Callable[[], dict[str, PowerModel | None]] | None = None
        self._writer_timeout_ns = 120 * 1_000_000_000
        self._cached: list[tuple[str, str, int, int]] = []
        self._marks: tuple[int, list[tuple[int, int | None]]] | None = None  # (read at, ns; (through_ns, offset) each)
        self._cached_at = float("-inf")

    def attach(
        self,
        engine: sa.Engine,
        power_w: Callable[[], dict[str, float | None]] | None = None,
        calibration: Callable[[], dict[str, PowerModel | None]] | None = None,
        writer_timeout_s: float = 120.0,
    ) -> None:
        with self._lock:
            self._engine, self._power_w, self._calibration = engine, power_w, calibration
            self._writer_timeout_ns = round(writer_timeout_s * 1e9)
            self._cached, self._marks, self._cached_at = [], None, float("-inf")

    def detach(self, engine: sa.Engine) -> None:
        with self._lock:
            if self._engine is engine:
                self._engine, self._power_w, self._calibration = None, None, None
                self._cached, self._marks = [], None

    def _energy_rows(self) -> list[tuple[str, str, int, int]]:
        with self._lock:
            if self._engine is None or time.monotonic() - self._cached_at < self.refresh_s:
                return self._cached
            try:
                with self._engine.connect() as conn:
                    rows = [(r.tenant, r.model_id, int(r.prefill_mj or 0), int(r.decode_mj or 0))
                            for r in conn.execute(_ENERGY_SQL)]  # fmt: skip
                    marks = (time.time_ns(), [(int(t), o) for t, o in conn.execute(_MARKS_SQL)])
            except sa.exc.SQLAlchemyError as exc:  # the database is down: serve the last figures
                log.warning("energy_metrics_unavailable", error=str(exc).splitlines()[0])
                return self._cached
            self._cached, self._marks, self._cached_at = _bounded(rows), marks, time.monotonic()
            return self._cached

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        energy = CounterMetricFamily(
            "joulegate_energy_joules",
            "GPU energy attributed to requests, by tenant, model and phase (prefill, decode); idle energy excluded.",
            labels=["tenant", "model", "phase"],
        )
        for tenant, model, prefill_mj, decode_mj in self._energy_rows():
            energy.add_metric([tenant, model, "prefill"], prefill_mj / 1000)
            energy.add_metric([tenant, model, "decode"], decode_mj / 1000)
        yield energy
        power_w = self._power_w
        if power_w is not None:
            power = GaugeMetricFamily(
                "joulegate_backend_power_watts",
                "Average GPU power of each backend over the last second (sum over its GPUs), from the energy counter.",
                labels=["backend"],
            )
            for backend, watts in sorted(power_w().items()):
                if watts is not None:
                    power.add_metric([backend], watts)
            yield power
        calibration = self._calibration
        if calibration is not None:
            yield from _calibration_families(calibration())
        marks = self._marks
        if marks is not None:
            yield from _writer_families(marks[1], marks[0], self._writer_timeout_ns)


def _writer_families(marks: list[tuple[int, int | None]], now_ns: int, timeout_ns: int) -> Iterator[GaugeMetricFamily]:
    """The ledgers' how-far marks and clock offsets (``ledger_writers``: (through_ns, clock_offset_ns) each) as the
    meter reads them for its seals."""
    live_marks = [(t, o) for t, o in marks if t >= now_ns - timeout_ns]
    live = [t for t, _ in live_marks]
    offsets = [o for _, o in live_marks if o is not None]
    writers = GaugeMetricFamily(
        "joulegate_ledger_writers",
        "Ledgers writing to the database (gateway replicas, workers, meters) by state: live (marked how far they have "
        "written within meter.writer_timeout_s: the meter seals nothing past the lowest mark) or silent (no longer "
        "waited for: what they write later is booked as the epochs' adjustment).",
        labels=["state"],
    )
    writers.add_metric(["live"], len(live))
    writers.add_metric(["silent"], len(marks) - len(live))
    yield writers
    if live:
        yield GaugeMetricFamily(
            "joulegate_ledger_writers_behind_seconds",
            "How far the lowest live ledger mark is behind now: 1-2 s normally; growing means a writer cannot reach "
            "the database (its records wait in its journal, and the meter's seals wait for them).",
            value=(now_ns - min(live)) / 1e9,
        )
    if offsets:
        yield GaugeMetricFamily(
            "joulegate_ledger_writers_clock_spread_seconds",
            "How far apart the clocks of the live ledgers (gateways, meters) are, each measured against the "
            "PostgreSQL server's with its mark: attribution lines the gateways' request times up with the meters' "
            "samples, so this should stay within a few ms (NTP); the meter logs writers past meter.clock_skew_warn_ms.",
            value=(max(offsets) - min(offsets)) / 1e9,
        )


def _calibration_families(models: dict[str, PowerModel | None]) -> Iterator[GaugeMetricFamily]:
    calibrated = GaugeMetricFamily(
        "joulegate_backend_calibrated",
        "1 when the meter attributes the backend with a fitted power model (its own, or one stored before it "
        "started); 0 while it uses the configured guess. Requests are sealed final only once the meter's own fit "
        "settles, or uncalibrated_seal_hold_s after they ended.",
        labels=["backend"],
    )
    lag = GaugeMetricFamily(
        "joulegate_backend_counter_lag_seconds",
        "The energy counter's fitted lag behind the wall clock (calibrated backends only).",
        labels=["backend"],
    )
    ratio = GaugeMetricFamily(
        "joulegate_backend_prefill_power_ratio",
        "Fitted prefill power over decode power, for a prefill step of the mean size (calibrated backends only).",
        labels=["backend"],
    )
    for backend, model in sorted(models.items()):
        calibrated.add_metric([backend], 0.0 if model is None else 1.0)
        if model is not None:
            lag.add_metric([backend], model.lag_ns / 1e9)
            ratio.add_metric([backend], model.prefill_power_ratio)
    yield calibrated
    yield lag
    yield ratio


ENERGY = EnergyCollector()
REGISTRY.register(ENERGY)


def _bounded(rows: list[tuple[str, str, int, int]]) -> list[tuple[str, str, int, int]]:
    """Keep the MAX_TENANT_LABELS tenants with the most energy; fold the rest into tenant "other"."""
    per_tenant: dict[str, int] = {}
    for tenant, _, p, d in rows:
        per_tenant[tenant] = per_tenant.get(tenant, 0) + p + d
    keep = set(sorted(per_tenant, key=lambda t: (-per_tenant[t], t))[:MAX_TENANT_LABELS])
    folded: dict[tuple[str, str], list[int]] = {}
    for tenant, model, p, d in rows:
        key = (tenant if tenant in keep else "other", model)
        acc = folded.setdefault(key, [0, 0])
        acc[0] += p
        acc[1] += d
    return [(t, m, p, d) for (t, m), (p, d) in sorted(folded.items())]
