"""``joulegate serve --workers N``: one host, N gateway processes on the same ports, one meter.

A Python gateway uses one core (the GIL), so a bigger host runs several: the fleet's layout (replicas with
``meter.source = none`` plus one meter per node, on one PostgreSQL) inside one command. The process tree:

- the **supervisor**, the ``joulegate serve`` process itself: it checks the ports are free and holds them (bound,
  not listening, ``SO_REUSEPORT``: port 0 resolves once for every worker, and another program cannot take the port
  between a worker's death and its restart), ensures the schema once, then starts the children and watches them.
  It serves no request and holds no database connection afterwards.
- **worker i** (0 ≤ i < N): a ``GatewayApp`` with the request path only (``meter.source = none``), its gRPC and
  HTTP listeners bound with ``SO_REUSEPORT`` on the shared ports, so the kernel spreads connections over the
  workers. Its own ledger journal: worker 0 keeps ``meter.journal_path`` (the one a single-process gateway uses,
  so going from 1 to N workers and back replays nothing twice), worker i > 0 ``<journal stem>.worker-<i>.jsonl``.
  The journal's ``flock`` refuses a second process on one journal, and the supervisor starts worker i again only
  after the previous worker i has exited.
- the **meter** (when ``meter.source`` is not ``none``): the ``joulegate meter`` daemon's code (sampler and
  attribution engine for the backends of this node, its ledger on ``<journal stem>.meter.jsonl``, no reports
  listener: the workers serve ``EnergyReports``). With ``auto`` and no NVML here it exits 0 and is not restarted.

A child that dies (``kill -9``, a crash) is started again, with the same index and so the same journal: its start
closes ``ABORTED`` the requests the dead one had in flight and replays what it had not stored, so no recorded
request is lost or counted twice. (The connections the dead worker had accepted, or that waited in its accept
queue, are reset: their clients see UNAVAILABLE or a cut stream, as when a replica dies; Linux >= 5.14 with
``net.ipv4.tcp_migrate_req = 1`` hands the queued ones to a live worker.) Journals of workers a run does not have
(an earlier run had more) are replayed by the supervisor at start (``adopt_orphan_journals``; a single gateway
does the same), so shrinking N leaves no request open. A child that keeps dying within seconds of its start (five
times in a row) stops the whole command (exit 1); one that exits 2 (a bad setting; ``--meter nvml`` where NVML is
not) stops it at once (exit 2). SIGTERM or SIGINT to the supervisor drains: every worker gets SIGTERM and drains as
a single gateway does (``server.drain_grace_s``), then the meter stops and flushes; a child still running
``drain_grace_s + 15`` s later is killed. A child whose supervisor vanished (``kill -9`` of the supervisor) drains
and exits on its own within a second.

Request ids are random 128-bit values (``common.ids``: from the OS's generator in each process): no
coordination between workers is needed for them to be unique.

Metrics: each worker has its own registry. ``/metrics`` on the shared HTTP port answers from whichever worker the
kernel hands the connection to (its ``joulegate_worker`` gauge says which): fine for a look, wrong to scrape.
For Prometheus, ``server.worker_metrics_listen = "HOST:PORT"`` gives worker i its own ``/metrics`` on
``HOST:PORT+i``: scrape each as a target (the energy gauges, read from SQL, are the host's in every worker, so
energy panels take ``max`` as they do across replicas).

SQLite is refused for N > 1 (``check_workers_db``): N ledgers, N rate limiters and a meter writing one file would
wait on its single write lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import signal
import socket
import sys
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from app.config import Config
from common.errors import ConfigError
from common.loop import run as run_loop

log = structlog.get_logger("joulegate.workers")

METER = "meter"
QUICK_EXIT_S = 10.0  # a child that exits sooner than this after its start failed to start
MAX_QUICK_EXITS = 5  # in a row: then the whole command stops
KILL_AFTER_GRACE_S = 15.0  # beyond drain_grace_s, before a child that does not exit is killed
PARENT_POLL_S = 0.5


def check_workers_db(config: Config) -> None:
    """ConfigError (exit 2) for several workers on SQLite."""
    from sqlalchemy.engine import make_url

    workers = config.server.workers
    if workers > 1 and make_url(config.db.url).get_backend_name() == "sqlite":
        raise ConfigError(
            f"server.workers = {workers} needs PostgreSQL: db.url is SQLite, whose one write lock {workers} "
            "gateway processes and a meter would queue on; run one worker on SQLite, or point db.url at PostgreSQL"
        )


def worker_journal_path(config: Config, index: int) -> Path:
    """Worker 0: ``meter.journal_path`` itself; worker i: ``<stem>.worker-<i>.jsonl`` beside it."""
    base = Path(config.meter.journal_path)
    return base if index == 0 else base.with_name(f"{base.stem}.worker-{index}.jsonl")


def orphan_journals(config: Config, workers: int) -> list[Path]:
    """Journals of workers >= ``workers`` that still hold segments: left by an earlier run with more workers (a
    worker killed, or a drain that could not reach the database). Nobody would take them over."""
    base = Path(config.meter.journal_path)
    pattern = re.compile(re.escape(base.stem) + r"\.worker-(\d+)\.jsonl(?:\.\d+)?$")
    found: set[int] = set()
    with contextlib.suppress(OSError):
        for path in base.parent.iterdir():
            m = pattern.match(path.name)
            if m and int(m.group(1)) >= workers:
                found.add(int(m.group(1)))
    return [worker_journal_path(config, k) for k in sorted(found)]


def adopt_orphan_journals(config: Config, workers: int, timeout_s: float = 30.0) -> None:
    """Replay the journals of workers that this run does not have (``orphan_journals``) into the database, as their
    worker would at its start: requests left open are closed ABORTED, records not yet stored are stored (idempotent:
    nothing is doubled). One that is locked (its process lives) or that the database cannot take now (an outage:
    left for the next start) is logged and left. Blocking."""
    from meter.journal import JournalLockedError
    from meter.ledger import Ledger
    from meter.store.db import make_engine

    paths = orphan_journals(config, workers)
    if not paths:
        return
    from meter.store.db import is_outage
    from meter.store.migrate import ensure_schema

    engine = make_engine(config.db.url)
    try:
        try:
            ensure_schema(engine)  # (a no-op but on a new database: rows must never meet missing tables)
        except Exception as exc:
            if not is_outage(exc):
                raise
            log.warning("worker_journals_left", paths=[str(p) for p in paths], reason="the database is away")
            return
        for path in paths:
            ledger = Ledger(engine, path)
            try:
                ledger.start()
            except JournalLockedError:
                log.warning("worker_journal_in_use", path=str(path), note="its process still runs: left to it")
                continue
            ledger.close(timeout_s)
            stats = ledger.stats
            log.info(
                "worker_journal_adopted",
                path=str(path),
                replayed=stats.replayed,
                aborted=stats.aborted,
                pending=stats.journal_pending,
            )
    finally:
        engine.dispose()


def _with_port(listen: str, port: int) -> str:
    host, _, _ = listen.rpartition(":")
    return f"{host}:{port}"


def _host_port(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def worker_config(config: Config, index: int) -> Config:
    """What worker ``index`` runs: the request path only, its own journal, its own metrics port."""
    server: dict[str, Any] = {}
    if config.server.worker_metrics_listen:
        _host, port = _host_port(config.server.worker_metrics_listen)
        server["worker_metrics_listen"] = _with_port(config.server.worker_metrics_listen, port + index)
    meter = config.meter.model_copy(update={"source": "none", "journal_path": str(worker_journal_path(config, index))})
    return config.model_copy(update={"meter": meter, "server": config.server.model_copy(update=server)})


def hold_port(listen: str) -> socket.socket:
    """Check that nobody listens on ``listen`` (a bind without ``SO_REUSEPORT`` fails if anything is bound there),
    then bind it with ``SO_REUSEPORT`` and keep it, not listening: the workers bind beside it. OSError when taken."""
    from common.net import bind_tcp

    host, port = _host_port(listen)
    if port != 0:
        bind_tcp(host, port, reuse_port=False).close()
    return bind_tcp(host, port, reuse_port=True)


# -- the supervisor ----------------------------------------------------------------------------------------------


@dataclass
class Child:
    role: str  # "worker-<i>" or "meter"
    config: Config
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    starts: int = 0
    quick_exits: int = 0


class Supervisor:
    def __init__(self, config: Config, *, python: str = sys.executable) -> None:
        self.config = config
        self.python = python
        self.stopping = False
        self.failure: tuple[int, str] | None = None
        self._stop = asyncio.Event()
        self.children: list[Child] = []
        self._held: list[socket.socket] = []

    async def run(self) -> int:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop)
        server = cfg.server
        grpc_sock = hold_port(server.grpc_listen)
        self._held.append(grpc_sock)
        updates: dict[str, Any] = {"grpc_listen": _with_port(server.grpc_listen, grpc_sock.getsockname()[1])}
        if server.http_listen:
            http_sock = hold_port(server.http_listen)
            self._held.append(http_sock)
            updates["http_listen"] = _with_port(server.http_listen, http_sock.getsockname()[1])
        cfg = cfg.model_copy(update={"server": server.model_copy(update=updates)})
        if server.worker_metrics_listen:  # each worker's own port: taken ones are named now, not in a restart loop
            from common.net import bind_tcp

            host, port = _host_port(server.worker_metrics_listen)
            for i in range(server.workers):
                try:
                    bind_tcp(host, port + i, reuse_port=False).close()
                except OSError as exc:
                    raise OSError(
                        f"server.worker_metrics_listen: worker {i} cannot listen on {host}:{port + i}: "
                        f"{exc.strerror or exc}"
                    ) from None
        await asyncio.to_thread(_prepare_database, cfg)
        if cfg.meter.source != "none":
            self.children.append(Child(METER, cfg))
        self.children += [Child(f"worker-{i}", worker_config(cfg, i)) for i in range(server.workers)]
        log.info(
            "workers_starting",
            workers=server.workers,
            meter=cfg.meter.source,
            grpc=cfg.server.grpc_listen,
            http=cfg.server.http_listen,
            worker_metrics=server.worker_metrics_listen,
        )
        if not server.worker_metrics_listen:
            log.info(
                "workers_metrics_shared",
                note="/metrics answers from one worker per connection; set server.worker_metrics_listen to scrape each",
            )
        watchers = [asyncio.create_task(self._watch(c)) for c in self.children]
        await self._stop.wait()
        await self._drain()
        for w in watchers:
            w.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await w
        for s in self._held:
            s.close()
        if self.failure is not None:
            code, message = self.failure
            from app.commands.database import CommandError

            if code == 2:
                raise ConfigError(message)
            raise CommandError(message)
        log.info("workers_stopped")
        return 0

    async def _spawn(self, child: Child) -> None:
        env = {**os.environ, "PYTHONPATH": _pythonpath()}
        child.proc = await asyncio.create_subprocess_exec(
            self.python,
            *("-m", "app.cli", "serve", "--role", child.role),
            stdin=asyncio.subprocess.PIPE,
            env=env,
        )
        assert child.proc.stdin is not None
        child.proc.stdin.write(child.config.model_dump_json().encode())
        child.proc.stdin.close()
        child.started = time.monotonic()
        child.starts += 1
        if child.role == METER:
            log.info("meter_process_started", role=child.role, pid=child.proc.pid, start=child.starts)
        else:
            log.info("worker_started", role=child.role, pid=child.proc.pid, start=child.starts)

    async def _watch(self, child: Child) -> None:
        """Start ``child``, and again each time it dies, until the drain."""
        try:
            await self._keep(child)
        except Exception as exc:  # cannot start a process at all (no memory, no such interpreter): stop, in one line
            self._fail(1, f"{child.role}: cannot start it: {type(exc).__name__}: {exc}")

    async def _keep(self, child: Child) -> None:
        while not self.stopping:
            await self._spawn(child)
            assert child.proc is not None
            if self.stopping:  # the drain began while it started: it was not among those told to stop
                with contextlib.suppress(ProcessLookupError):
                    child.proc.send_signal(signal.SIGTERM)
            rc = await child.proc.wait()
            if self.stopping:
                break
            lived = time.monotonic() - child.started
            log.warning("worker_exited", role=child.role, pid=child.proc.pid, exit=rc, lived_s=round(lived, 2))
            if child.role == METER and rc == 0:  # meter.source auto, and no energy counter here: nothing to meter
                break
            if rc == 2:
                self._fail(2, f"{child.role} exited 2 (a bad setting: its one-line error is above)")
                break
            child.quick_exits = child.quick_exits + 1 if lived < QUICK_EXIT_S else 0
            if child.quick_exits >= MAX_QUICK_EXITS and child.role != METER:  # the meter waits out a database outage
                self._fail(
                    1,
                    f"{child.role} exited {MAX_QUICK_EXITS} times in a row within {QUICK_EXIT_S:.0f} s of its start "
                    f"(last exit status {rc}; its log is above)",
                )
                break
            await asyncio.sleep(min(5.0, 0.1 * 2**child.quick_exits))

    def _request_stop(self) -> None:
        """SIGTERM or SIGINT (or a failure): from now on no child is started again."""
        self.stopping = True
        self._stop.set()

    def _fail(self, code: int, message: str) -> None:
        if self.failure is None:
            self.failure = (code, message)
        self._request_stop()

    async def _drain(self) -> None:
        """SIGTERM to every worker (each drains), then to the meter; kill what outlives the grace."""
        grace = self.config.server.drain_grace_s + KILL_AFTER_GRACE_S
        workers = [c for c in self.children if c.role != METER]
        meters = [c for c in self.children if c.role == METER]
        log.info("workers_draining", workers=len(workers), grace_s=self.config.server.drain_grace_s)
        await _terminate(workers, grace)
        await _terminate(meters, grace)


async def _terminate(children: list[Child], grace_s: float) -> None:
    procs = [c.proc for c in children if c.proc is not None and c.proc.returncode is None]
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
    if not procs:
        return
    _done, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=grace_s)
    for p in procs:
        if p.returncode is None:
            log.warning("worker_killed", pid=p.pid, reason=f"still running {grace_s:.0f} s after SIGTERM")
            with contextlib.suppress(ProcessLookupError):
                p.kill()
    for fut in pending:
        await fut


def _pythonpath() -> str:
    """The children import the same joulegate as this process, installed or run from a source tree."""
    root = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return root if not rest else f"{root}{os.pathsep}{rest}"


def _prepare_database(config: Config) -> None:
    """The schema, once, before the children start (they would race to create it), and the journals of workers
    this run does not have; a database that is away is left to the children, which wait for it."""
    from app.metering import seed_billing_settings
    from meter.store.db import is_outage, make_engine
    from meter.store.migrate import ensure_schema

    engine = make_engine(config.db.url)
    try:
        ensure_schema(engine)
        seed_billing_settings(config, engine, "joulegate serve")
    except Exception as exc:
        if not is_outage(exc):
            raise
        log.warning("database_unavailable_at_start", error=(str(exc).splitlines() or [""])[0][:300])
        return
    finally:
        engine.dispose()
    adopt_orphan_journals(config, config.server.workers)


def one_write_per_line() -> None:
    """Each log line leaves this process in one ``write`` (structlog's default logger prints the message and its
    newline in two, and a non-interactive stderr passes each on at once): N workers, the meter and the supervisor
    share one stderr, and lines must not interleave."""
    structlog.configure(logger_factory=structlog.WriteLoggerFactory(file=sys.stderr))


def supervise(config: Config) -> int:
    one_write_per_line()
    return asyncio.run(Supervisor(config).run())


# -- the children --------------------------------------------------------------------------------------------------


def _tag_logs(role: str) -> None:
    """Every log line of this child says which it is (``worker``: its index, or ``meter``) and its pid."""
    tag: dict[str, Any] = {"worker": int(role.split("-")[1]) if role != METER else METER, "pid": os.getpid()}

    def add(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k, v in tag.items():
            event.setdefault(k, v)
        return event

    processors = list(structlog.get_config()["processors"])
    structlog.configure(processors=[add, *processors])


async def _watch_parent(parent: int) -> None:
    """Drain (SIGTERM to this process) when the supervisor is gone (killed): no child outlives it for long, and the
    next supervisor's children find their journals free."""
    while True:
        await asyncio.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            break
    log.warning("supervisor_gone", action="draining")
    os.kill(os.getpid(), signal.SIGTERM)


def run_child(role: str, config: Config) -> int:
    """The body of ``joulegate serve --role ROLE`` (started by the supervisor, config on stdin)."""
    one_write_per_line()
    _tag_logs(role)
    if role == METER:
        return asyncio.run(_meter(config))
    return run_loop(_worker(int(role.split("-")[1]), config), config.server.event_loop)


async def _worker(index: int, config: Config) -> int:
    from prometheus_client import Gauge

    from app.server import GatewayApp
    from common.net import share_ports
    from proxy.metrics import REGISTRY

    parent = os.getppid()
    share_ports()
    Gauge(
        "joulegate_worker",
        "1, labelled with the worker that answered this scrape",
        ["worker", "pid"],
        registry=REGISTRY,
    ).labels(str(index), str(os.getpid())).set(1)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    app = GatewayApp(config, share_ports=True)
    await app.start()
    metrics = None
    if config.server.worker_metrics_listen:
        metrics = await _serve_metrics(config.server.worker_metrics_listen)
    tasks = [asyncio.create_task(_watch_parent(parent))]
    gc.collect()
    gc.freeze()  # as GatewayApp.run_until_signalled does: what start built is out of the collector's way
    log.info("worker_serving", index=index, journal=config.meter.journal_path)
    await stop.wait()
    for t in tasks:
        t.cancel()
    if metrics is not None:
        await metrics.cleanup()
    await app.stop()
    return 0


async def _serve_metrics(listen: str) -> Any:
    """This worker's own ``/metrics`` (its registry alone), for a per-worker scrape."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from common.net import bind_tcp
    from proxy.metrics import REGISTRY

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = _host_port(listen)
    site = web.SockSite(runner, bind_tcp(host, port, reuse_port=False))
    await site.start()
    log.info("worker_metrics_started", listen=listen)
    return runner


async def _meter(config: Config) -> int:
    from app.commands.meter import _serve, meter_journal_path
    from app.metering import local_backends

    if config.meter.source == "auto":
        from meter.sources.nvml import NvmlSource, NvmlUnavailableError

        try:
            NvmlSource().close()
        except NvmlUnavailableError as exc:
            log.info("meter_off", reason=f"meter.source is auto and NVML is not usable here: {exc}")
            return 0
        config = config.model_copy(update={"meter": config.meter.model_copy(update={"source": "nvml"})})
    if not local_backends(config):
        log.info("meter_off", reason="no backend runs on this node")
        return 0
    from meter.sources.nvml import NvmlUnavailableError

    watch = asyncio.create_task(_watch_parent(os.getppid()))
    try:
        return await _serve(config, meter_journal_path(config), None)
    except NvmlUnavailableError as exc:  # --meter nvml where there is none: no restart mends that (exit 2 stops all)
        raise ConfigError(f"--meter {config.meter.source}: {exc} (--meter none serves without metering)") from None
    finally:
        watch.cancel()
