"""Assembly of one gateway process: store, ledger, backends, shaping, the gRPC server (and its neighbours).

``GatewayApp(config)`` owns the parts and their order: start brings up the database (schema created if
missing), the ledger writer, backend health checks and the gRPC server with reflection and health; stop drains
(health NOT_SERVING, no new calls, in-flight calls finish within the grace period) and flushes the ledger.

A database that does not answer at start does not stop the gateway from starting (a restart during an outage
would otherwise be an outage of the gateway): everything starts, health says NOT_SERVING (gRPC health, HTTP
``/health`` 503) while a task retries the database with backoff (tenacity), and once it answers (schema ensured)
health turns SERVING. Meanwhile the ledger journals (``meter.ledger``), and calls get UNAVAILABLE from the
authenticator, which knows no key yet (``meter.auth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
import tenacity

from app.config import Config
from app.metering import (
    authenticator,
    budget_usage_reader,
    build_meter_service,
    seed_billing_settings,
    settings_from_config,
)
from common.errors import SchemaMismatchError
from common.grpc_handlers import add_servicer, bind_grpc
from common.grpc_introspection import add_introspection
from common.logs import as_fields
from common.net import share_ports
from common.tls import ReloadingContext, grpc_server_credentials
from meter.ledger import Ledger
from meter.reports_api import SERVICE as ENERGY_REPORTS
from meter.reports_api import EnergyReportsServicer
from meter.service import MeterService
from meter.store.db import is_outage, make_engine
from meter.store.migrate import ensure_schema
from proxy.backends import Backend, BackendPool, run_health_checks
from proxy.budgets import Budgets
from proxy.energy_metrics import ENERGY as ENERGY_METRICS
from proxy.gateway import Gateway
from proxy.grpc_api import GenerationServicer
from proxy.http import HttpFrontDoor
from proxy.input_counts import InputCounts, load_tokenizer
from proxy.params import ModelLimits
from proxy.pb.fmaas import generation_pb2
from proxy.rate_limits import RateLimiter
from proxy.shaping import build_shapers
from proxy.tracing import Tracing

log = structlog.get_logger(__name__)

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name


@dataclass
class GatewayApp:
    config: Config
    grpc_port: int = 0  # the bound port, once started
    http_port: int = 0  # the bound HTTP port, once started (0: HTTP disabled)
    _tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    span_exporter: Any = None  # an OpenTelemetry SpanExporter to trace to instead of [tracing] endpoint (tests)
    share_ports: bool = False  # a worker of `serve --workers N`: both listeners with SO_REUSEPORT (app.workers)

    def __post_init__(self) -> None:
        cfg = self.config
        self.engine = make_engine(cfg.db.url)
        self.ledger = Ledger(self.engine, cfg.meter.journal_path)
        self.meter: MeterService | None = None  # the in-process meter (sampler + engine), unless meter.source is none
        self.auth = authenticator(cfg, self.engine)
        self.pools = {
            m.model_id: BackendPool(
                m.model_id, [Backend(b, m.model_id, cfg.backend_pool) for b in m.backends], cfg.routing
            )
            for m in cfg.models
        }
        self.limits = {
            m.model_id: ModelLimits(
                max_new_tokens=m.max_new_tokens, default_include_stop_sequence=m.include_stop_sequence
            )
            for m in cfg.models
        }
        self.shapers = build_shapers({m.model_id: m.shaping for m in cfg.models})
        self.budgets = Budgets(cfg.budgets, budget_usage_reader(cfg, self.engine)) if cfg.budgets.enabled else None
        self.gateway = Gateway(
            self.pools,
            self.shapers,
            self.ledger,
            retries=cfg.backend_pool.retries,
            rate_limiter=RateLimiter(cfg.rate_limits, self.engine) if cfg.rate_limits.enabled else None,
            budgets=self.budgets,
        )
        self.tracing = Tracing.from_config(cfg.tracing, self.span_exporter)
        self.gateway.tracing = self.tracing
        self._stop_health = asyncio.Event()
        self.server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", int(self.share_ports)),
                ("grpc.max_concurrent_streams", cfg.server.grpc_max_concurrent_streams),
                ("grpc.keepalive_permit_without_calls", 1),
            ]
        )
        add_servicer(
            self.server,
            generation_pb2.DESCRIPTOR.services_by_name["GenerationService"],
            GenerationServicer(
                self.gateway,
                self.auth,
                self.limits,
                max_batch_requests=cfg.server.max_batch_requests,
                input_counts=_input_counts(cfg),
            ),
        )
        reports = EnergyReportsServicer(
            self.engine,
            self.auth,
            settings_from_config(cfg),
            nudge=lambda: self.meter.run_soon() if self.meter is not None else None,  # wait_final: attribute now
        )
        add_servicer(self.server, ENERGY_REPORTS, reports)
        # every served name (reflection lists them; health answers for each and for "")
        self.health, self.service_names = add_introspection(self.server, [GENERATION_SERVICE, ENERGY_REPORTS.full_name])
        self.http = (
            HttpFrontDoor(self.gateway, self.auth, self.limits, max_batch_requests=cfg.server.max_batch_requests)
            if cfg.server.http_listen
            else None
        )

    async def start(self) -> None:
        cfg = self.config
        if await self._try_database():
            self.gateway.mark_ready()
        if self.budgets is not None:  # read once before serving, so a restart does not forget who is over budget
            if self.gateway.ready:  # (a database away at start is read again every refresh_s, like any outage)
                await asyncio.to_thread(self.budgets.refresh)
            self._tasks.append(asyncio.create_task(self.budgets.run()))
        self.ledger.start()
        ENERGY_METRICS.attach(
            self.engine,
            power_w=lambda: {b.name: self.meter.power_w(b.name) for b in cfg.backends} if self.meter else {},
            calibration=lambda: dict(self.meter.engine.stats.calibration) if self.meter else {},
            writer_timeout_s=cfg.meter.writer_timeout_s,
        )
        if cfg.meter.source != "none":
            self.meter = await asyncio.to_thread(build_meter_service, cfg, self.engine, self.ledger)
            if self.meter is not None:
                self.meter.start()
        for pool in self.pools.values():
            pool.on_health_change(self._update_health)
        await asyncio.gather(*(p.check_all() for p in self.pools.values()))
        await self._update_health()
        self._tasks.append(
            asyncio.create_task(
                run_health_checks(self.pools.values(), cfg.backend_pool.health_interval_s, self._stop_health)
            )
        )
        tls = cfg.tls.files()
        self.grpc_port = bind_grpc(self.server, cfg.server.grpc_listen, grpc_server_credentials(tls) if tls else None)
        await self.server.start()
        if self.http is not None and cfg.server.http_listen:
            if self.share_ports:
                share_ports()  # the HTTP front door binds through common.net
            ssl_context = ReloadingContext(tls) if tls else None
            self.http_port = await self.http.start(cfg.server.http_listen, ssl_context)
            if ssl_context is not None:
                self._tasks.append(asyncio.create_task(_reload_tls(ssl_context, cfg.tls.reload_interval_s)))
        if not self.gateway.ready:
            self._tasks.append(asyncio.create_task(self._await_database()))
        log.info(
            "gateway_started",
            grpc=cfg.server.grpc_listen,
            grpc_port=self.grpc_port,
            http=cfg.server.http_listen,
            http_port=self.http_port,
            tls="mutual" if tls and tls.client_ca_path else bool(tls),
            models={m: [b.url for b in p.backends] for m, p in self.pools.items()},
            healthy={m: p.healthy for m, p in self.pools.items()},
            event_loop=type(asyncio.get_running_loop()).__module__.split(".")[0],  # "asyncio" or "uvloop"
        )

    def _prepare_database(self) -> None:
        """The schema, and the billing settings seeded from this config when the database holds none (blocking)."""
        ensure_schema(self.engine)
        seed_billing_settings(self.config, self.engine, "joulegate serve")

    async def _try_database(self) -> bool:
        """Ensure the schema once. False when the database is away (retried later); other errors (a schema newer
        than this version, a bad URL) stop the start."""
        try:
            await asyncio.to_thread(self._prepare_database)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("database_unavailable_at_start", error=_first_line(exc), health="NOT_SERVING until it answers")
            return False
        return True

    async def _await_database(self) -> None:
        """Retry the database until it answers, then serve."""
        retrying = tenacity.AsyncRetrying(
            wait=tenacity.wait_exponential(multiplier=0.2, max=5.0) + tenacity.wait_random(0, 0.2),
            before_sleep=_log_database_retry,
        )
        async for attempt in retrying:
            with attempt:
                await asyncio.to_thread(self._prepare_database)
        self.gateway.mark_ready()
        log.info("database_available", health="SERVING" if self.gateway.healthy else "NOT_SERVING (no backend)")
        await self._update_health()

    async def _update_health(self) -> None:
        """``""`` and the generation service follow the backends; the other services (reports, health,
        reflection) need none and serve until the drain."""
        await self.health.set(("", GENERATION_SERVICE), self.gateway.healthy)
        others = [n for n in self.service_names if n != GENERATION_SERVICE]
        await self.health.set(others, not self.gateway.draining)

    async def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish (up to the grace), flush the ledger."""
        grace = self.config.server.drain_grace_s if grace_s is None else grace_s
        await asyncio.gather(*(s.drain() for s in self.shapers.values()))
        self.gateway.begin_drain(grace)
        await self._update_health()
        log.info("gateway_draining", grace_s=grace)
        await asyncio.gather(self.server.stop(grace), *([self.http.stop(grace)] if self.http is not None else []))
        self._stop_health.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.gateway.flush_records()  # timelines waiting for a backend's prompt count, before the pools close
        await asyncio.gather(*(p.close() for p in self.pools.values()))
        if self.meter is not None:  # after the last request, before the ledger's last flush
            await asyncio.to_thread(self.meter.stop)
        await asyncio.to_thread(self.ledger.close)
        ENERGY_METRICS.detach(self.engine)
        self.engine.dispose()
        await asyncio.to_thread(self.tracing.shutdown)  # the spans still batched go out
        log.info("gateway_stopped", ledger=as_fields(self.ledger.stats))

    async def run_until_signalled(self) -> None:
        """Start, serve until SIGTERM or SIGINT, then drain and stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        # Everything built at start (modules, protobuf descriptors, config, pools) lives as long as the process: move
        # it out of the collector's reach, so that a full collection under traffic scans only what requests made. It
        # was the gateway's whole tail: gen-2 pauses of ~70 ms every ~0.6 s at 16 streams (bench/proxy_overhead.py).
        gc.collect()
        gc.freeze()
        await stop.wait()
        await self.stop()


def _log_database_retry(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, SchemaMismatchError):  # it answers, at another revision: waits for `joulegate migrate`
        log.warning("database_schema_mismatch", attempt=state.attempt_number, error=str(exc))
    else:
        log.info("database_still_unavailable", attempt=state.attempt_number, error=_first_line(exc) if exc else None)


def _first_line(exc: BaseException | None) -> str:
    return (str(exc).splitlines() or [""])[0][:300]


async def _reload_tls(context: ReloadingContext, interval_s: float) -> None:
    """Rotated certificate files reach the HTTP listener within ``interval_s`` (gRPC sees them at its next
    handshake)."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(context.maybe_reload)


def _input_counts(cfg: Config) -> InputCounts:
    """TGIS input counts, with the tokenizer of each model that names its ``tokenizer_file``."""
    tokenizers = {
        m.model_id: load_tokenizer(m.tokenizer_file, f"models.{i}.tokenizer_file")
        for i, m in enumerate(cfg.models)
        if m.tokenizer_file is not None
    }
    return InputCounts(tokenizers)
