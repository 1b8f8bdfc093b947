"""``joulegate meter``: the metering daemon alone (one per GPU node in a fleet), and the meter of ``joulegate serve``.

The daemon samples the energy counters of the backends that run on this node (``backends[].node`` equal to
``meter.node``, which defaults to the hostname, or empty), writes the samples through a ledger of its own (journal:
``<meter.journal_path>.meter.jsonl`` unless ``--journal`` says otherwise, so it never shares a journal with a
gateway on the same host), and runs the metering engine for those backends, until SIGTERM or SIGINT; then it drains
(stops the sampler and the engine, flushes the ledger).

The assembly from configuration lives in ``app.metering`` (``joulegate serve --meter ...`` uses it too).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.commands.database import check_db_url, url_origin
from app.commands.tls_flags import add_tls_arguments, tls_overrides
from app.config import Config, load_config
from app.metering import authenticator, build_meter_service, local_backends, node_name, seed_billing_settings
from common.config import LISTEN_HELP
from common.errors import ConfigError

if TYPE_CHECKING:
    from meter.service import MeterService


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file (backends, [meter], [db])")
    parser.add_argument("--db", metavar="URL", help="database URL (default: the config's db.url)")
    parser.add_argument("--source", choices=["nvml", "sim"], help="energy source (default: the config's meter.source)")
    parser.add_argument("--node", metavar="NAME", help="this node's name, matched against backends' node")
    parser.add_argument("--journal", metavar="PATH", help="ledger journal (default: <meter.journal_path>.meter.jsonl)")
    parser.add_argument("--log-format", choices=["json", "console"])
    parser.add_argument(
        "--grpc-listen",
        metavar="HOST:PORT",
        help=f"joulegate.v1.EnergyReports, health and reflection: {LISTEN_HELP} (default: meter.grpc_listen, "
        "0.0.0.0:8034)",
    )
    add_tls_arguments(parser)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    meter: dict[str, Any] = {}
    if args.db:
        out["db"] = {"url": args.db}
    if args.source:
        meter["source"] = args.source
    if args.node:
        meter["node"] = args.node
    if getattr(args, "grpc_listen", None) is not None:  # "" is a value: off, as in the file and the environment
        meter["grpc_listen"] = args.grpc_listen
    if meter:
        out["meter"] = meter
    if getattr(args, "log_format", None):
        out["server"] = {"log_format": args.log_format}
    return {**out, **tls_overrides(args)}


def meter_journal_path(config: Config) -> Path:
    base = Path(config.meter.journal_path)
    return base.with_name(base.stem + ".meter.jsonl")


def run(args: argparse.Namespace) -> int:
    from app.commands.failures import start_failure
    from common.logs import configure_logging

    config = load_config(args.config, overrides=_overrides(args))
    if config.meter.source == "none":
        raise ConfigError("no energy source: give --source nvml|sim or meter.source")
    if config.meter.source == "auto":  # the daemon exists to meter this node's GPUs: auto means NVML, or fail
        config = config.model_copy(update={"meter": config.meter.model_copy(update={"source": "nvml"})})
    if not local_backends(config):
        raise ConfigError(
            f"no backend runs on node {node_name(config.meter)!r} (backends[].node must be empty or this node's name)"
        )
    check_db_url(config.db.url, must_exist=False, origin=url_origin(args))
    configure_logging(config.server.log_level, config.server.log_format)
    journal = Path(args.journal) if args.journal else meter_journal_path(config)
    try:
        return asyncio.run(_serve(config, journal, config.meter.grpc_listen))
    except Exception as exc:
        failure = start_failure(exc, config.db.url, f"meter source {config.meter.source}")
        if failure is None:
            raise
        raise failure from None


async def _serve(config: Config, journal: Path, reports_listen: str | None = None) -> int:
    import structlog

    from common.logs import as_fields
    from meter.ledger import Ledger
    from meter.store.db import make_engine
    from meter.store.migrate import ensure_schema

    log = structlog.get_logger("joulegate.meter")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    db = make_engine(config.db.url)
    await asyncio.to_thread(ensure_schema, db)
    await asyncio.to_thread(seed_billing_settings, config, db, "joulegate meter")
    ledger = Ledger(db, journal)
    ledger.start()
    service: MeterService | None = None
    reports = None
    try:
        service = await asyncio.to_thread(build_meter_service, config, db, ledger)
        if service is None:  # only meter.source = "auto" finds nothing to meter, and the daemon never runs on auto
            raise ConfigError(f"meter source {config.meter.source}: no energy counter to meter on this node")
        service.start()
        if reports_listen:
            from app.metering import settings_from_config
            from meter.reports_api import start_reports_server

            reports = await start_reports_server(
                db,
                authenticator(config, db),
                settings_from_config(config),
                reports_listen,
                nudge=service.run_soon,
                tls=config.tls.files(),
            )
        log.info("meter_daemon_started", node=node_name(config.meter), backends=service.stats.backends)
        await stop.wait()
        log.info("meter_daemon_draining")
    finally:
        if reports is not None:
            await reports.stop(config.server.drain_grace_s)
        if service is not None:
            await asyncio.to_thread(service.stop)
        await asyncio.to_thread(ledger.close)
        db.dispose()
        log.info("meter_daemon_stopped", ledger=as_fields(ledger.stats))
    return 0
