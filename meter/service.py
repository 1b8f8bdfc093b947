"""The meter service: a sampler feeding the ledger, and the metering engine's loop, on their own threads.

It runs inside the gateway process (``joulegate serve --meter sim|nvml``, sharing the gateway's database engine and
ledger) and alone (``joulegate meter``, one per GPU node, with a ledger of its own). Either way:

- the ``Sampler`` reads the energy source every ``interval_ms`` and hands each read's samples to the ledger's
  ``add_samples`` (non-blocking; the ledger writes them in batches, or journals them through a database outage),
  each device's after the last one an earlier process kept, in the database or in the journal it left
  (``Sampler``'s ``seed``: a clock stepped back across a restart);
- the engine thread calls ``MeteringEngine.run_once`` every ``engine_interval_s``. A pass that fails (database down)
  is logged and retried with backoff; every epoch is its own transaction, so nothing is left half written.

Backends are named here with their devices: a simulator's device is the name it answers with (known after its first
answer, so it is looked up on every pass), an NVML backend's devices are its GPUs' UUID names.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import sqlalchemy as sa
import structlog

from meter.engine import EngineSettings, EngineStats, MeteredBackend, MeteringEngine
from meter.engine.sql import last_samples
from meter.lifecycle import Lifecycle
from meter.sampler import INTERVAL_MS, Sampler, SamplerStats
from meter.samples import EnergySource, Sample
from meter.weights import WeightsWatch

log = structlog.get_logger(__name__)

__all__ = ["BackendSpec", "MeterService", "MeterStats", "build_meter_service", "meter_backends"]

ENGINE_INTERVAL_S = 1.0  # how often the engine runs a pass
_MAX_BACKOFF_S = 5.0  # a failed pass costs one connection attempt; retry soon after the database returns
_LOG_EVERY_S = 60.0


class SampleSink(Protocol):
    def add_samples(self, samples: Sequence[Sample]) -> None: ...

    def journaled_stamps(self, devices: Sequence[str]) -> Mapping[str, int]:
        """Where each device's samples end in what an earlier process journaled and the database may lack yet."""
        ...


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A backend as the configuration describes it (``meter`` does not import ``proxy``'s config)."""

    name: str
    url: str
    gpus: tuple[int, ...] = ()
    prefill_chunk_tokens: int | None = None  # its engine's prefill chunk (``MeteredBackend``)


@dataclass(frozen=True, slots=True)
class MeterStats:
    running: bool
    sampler: SamplerStats
    engine: EngineStats
    backends: dict[str, tuple[str, ...]]  # backend -> devices
    engine_pass_s: float | None  # duration of the last engine pass
    engine_failures: int  # consecutive failed passes (0 when the last one worked)


class MeterService:
    """Sampler + engine loop. ``start`` and ``stop`` from any thread; ``stop`` does not close the ledger."""

    def __init__(
        self,
        db: sa.Engine,
        sink: SampleSink,
        source: EnergySource,
        backends: Callable[[], Sequence[MeteredBackend]],
        settings: EngineSettings | None = None,
        *,
        interval_ms: int = INTERVAL_MS,
        engine_interval_s: float = ENGINE_INTERVAL_S,
        close_source: bool = True,
        weights: WeightsWatch | None = None,
    ) -> None:
        """``weights``: asks the backends what they serve (started and stopped with the service), so that the
        engine starts a backend's fit over when its weights change under the same model id."""
        if engine_interval_s <= 0:
            raise ValueError(f"engine_interval_s must be positive, got {engine_interval_s}")
        self._source = source
        self._resolve = backends
        self._close_source = close_source
        self._db = db
        self._sink = sink
        self.sampler = Sampler(source, sink.add_samples, interval_ms=interval_ms, seed=self._stored_stamps)
        self._weights = weights
        self.engine = MeteringEngine(db, list(backends()), settings, weights=weights.at if weights else None)
        self._engine_interval_s = engine_interval_s
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = Lifecycle.NEW
        self._pass_s: float | None = None
        self._failures = 0
        self._last_logged = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        if self._state is not Lifecycle.NEW:
            raise RuntimeError(f"MeterService.start() on a service that is {self._state.value}")
        self.sampler.start()
        if self._weights is not None:
            self._weights.start()
        self._thread = threading.Thread(target=self._run, name="joulegate-engine", daemon=True)
        self._state = Lifecycle.RUNNING
        self._thread.start()
        log.info("meter_started", backends={b.name: b.devices for b in self.engine.backends})

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the sampler (its last samples are already with the ledger) and the engine loop; close the source."""
        deadline = time.monotonic() + timeout_s
        self._state = Lifecycle.CLOSED
        self.sampler.stop(max(0.1, timeout_s / 2))
        if self._weights is not None:
            self._weights.stop(0.1)  # a poll in flight ends within its timeout on a daemon thread
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.1, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("meter_engine_still_busy_at_stop")
        if self._close_source:
            self._source.close()
        log.info("meter_stopped", engine=dataclasses.asdict(self.engine.stats))  # fields, not a repr

    def _stored_stamps(self, devices: Sequence[str]) -> dict[str, int | None]:
        """The stamp of each device's last sample kept before this process, in the journal an earlier process left
        (its replay may not have run yet) or in the database: this meter's samples go after them in read order. The
        journal is read first: a segment gone by then was replayed, so the database holds its samples. With the
        database away, the journal's stamps alone (logged: a clock stepped back may then interleave with samples
        only the database has)."""
        journaled = self._sink.journaled_stamps(devices)
        try:
            with self._db.connect() as conn:
                stored: Sequence[int | None] = last_samples(conn, devices)
        except Exception as exc:
            log.warning("meter_seeded_from_journal_only", devices=list(devices), error=f"{type(exc).__name__}: {exc}")
            stored = [None] * len(devices)
        out: dict[str, int | None] = {}
        for device, t_ns in zip(devices, stored, strict=True):
            kept = [t for t in (t_ns, journaled.get(device)) if t is not None]
            out[device] = max(kept) if kept else None
        return out

    def run_soon(self) -> None:
        """Ask the engine loop for a pass now (tests, and a reports call that waits for finality)."""
        self._wake.set()

    @property
    def state(self) -> Lifecycle:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is Lifecycle.RUNNING and self._thread is not None and self._thread.is_alive()

    # -- readouts --------------------------------------------------------------------------------------------------

    @property
    def stats(self) -> MeterStats:
        return MeterStats(
            running=self.running,
            sampler=self.sampler.stats,
            engine=self.engine.stats,
            backends={b.name: b.devices for b in self.engine.backends},
            engine_pass_s=self._pass_s,
            engine_failures=self._failures,
        )

    def power_w(self, backend: str) -> float | None:
        """Latest average power of a backend (sum over its devices; ~1 s window, for /metrics only)."""
        spec = next((b for b in self.engine.backends if b.name == backend), None)
        if spec is None:
            return None
        parts = [self.sampler.power_w(d) for d in spec.devices]
        return None if any(p is None for p in parts) else sum(p for p in parts if p is not None)

    # -- the engine loop -------------------------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            t0 = time.monotonic()
            try:
                self.engine.set_backends(list(self._resolve()))
                self.engine.run_once()
            except Exception as exc:
                self._failures += 1
                delay = min(_MAX_BACKOFF_S, self._engine_interval_s * 2 ** min(self._failures, 8))
                now = time.monotonic()
                if self._failures == 1 or now - self._last_logged >= _LOG_EVERY_S:
                    self._last_logged = now
                    log.warning(
                        "meter_engine_pass_failed",
                        error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300],
                        failures=self._failures,
                        retry_in_s=round(delay, 2),
                        exc_info=not _is_db_outage(exc),
                    )
                continue
            if self._failures:
                log.info("meter_engine_recovered", failed_passes=self._failures)
            self._failures = 0
            self._pass_s = time.monotonic() - t0
            delay = max(0.0, self._engine_interval_s - self._pass_s)


def _is_db_outage(exc: BaseException) -> bool:
    return isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError | OSError)


# -- building one from a configuration ----------------------------------------------------------------------------


def meter_backends(
    kind: Literal["nvml", "sim"], specs: Sequence[BackendSpec], *, counter_every: int = 1
) -> tuple[EnergySource, Callable[[], list[MeteredBackend]]]:
    """The energy source over ``specs`` and how to name each backend's devices. Blocking (reads the source once).

    ``sim``: one ``SimSource`` over the backends' URLs; a backend's device is the one its simulator names.
    ``nvml``: one ``NvmlSource`` over every GPU the backends list; a backend with no ``gpus`` is allowed only when it
    is the only one, and then owns every GPU of the host; ``counter_every``: its counter reads (``NvmlSource``).
    Raises ``ValueError`` (or ``NvmlUnavailableError``).
    """
    if not specs:
        raise ValueError("no backends to meter on this node")
    if kind == "sim":
        from meter.sources.sim import SimSource

        urls = list(dict.fromkeys(s.url for s in specs))
        source = SimSource(urls)
        index = {s.name: urls.index(s.url) for s in specs}

        def sim_backends() -> list[MeteredBackend]:
            devices = source.devices
            return [MeteredBackend(s.name, (devices[index[s.name]],), s.prefill_chunk_tokens) for s in specs]

        return source, sim_backends
    if kind == "nvml":
        from meter.sources.nvml import NvmlSource

        if any(not s.gpus for s in specs):
            if len(specs) > 1:
                names = [s.name for s in specs if not s.gpus]
                raise ValueError(
                    f"backends {names} list no gpus: with several backends on a node, name each one's GPUs"
                )
            nvml = NvmlSource(None, counter_every=counter_every)
            whole = MeteredBackend(specs[0].name, nvml.devices, specs[0].prefill_chunk_tokens)
            return nvml, lambda: [whole]
        indices = sorted({g for s in specs for g in s.gpus})
        nvml = NvmlSource(indices, counter_every=counter_every)
        by_index = dict(zip(nvml.gpu_indices, nvml.devices, strict=True))
        fixed = [MeteredBackend(s.name, tuple(by_index[g] for g in s.gpus), s.prefill_chunk_tokens) for s in specs]
        return nvml, lambda: list(fixed)
    raise ValueError(f"unknown meter source {kind!r} (expected nvml or sim)")


def build_meter_service(
    kind: Literal["nvml", "sim"],
    specs: Sequence[BackendSpec],
    db: sa.Engine,
    sink: SampleSink,
    settings: EngineSettings,
    *,
    interval_ms: int = INTERVAL_MS,
    engine_interval_s: float = ENGINE_INTERVAL_S,
    counter_every: int = 1,
) -> MeterService:
    """A ``MeterService`` over the backends ``specs`` with the ``kind`` of source (not started). Blocking."""
    source, backends = meter_backends(kind, specs, counter_every=counter_every)
    try:
        weights = WeightsWatch({spec.name: spec.url for spec in specs})
        return MeterService(
            db,
            sink,
            source,
            backends,
            settings,
            interval_ms=interval_ms,
            engine_interval_s=engine_interval_s,
            weights=weights,
        )
    except BaseException:
        source.close()
        raise
