"""``joulegate serve``: the gateway process (gRPC on 8033, HTTP on 8080), with an in-process meter if asked; with
``--workers N`` (N > 1) a supervisor of N gateway processes on the same ports and one meter (``app.workers``).

What can stop it at start ends as one line (``app.cli``): a bad setting, a database it cannot use, an energy
source that is not there (``--meter nvml`` without a GPU), a port it cannot listen on.
"""

from __future__ import annotations

import argparse
from typing import Any

from app.commands.database import check_db_url, url_origin
from app.commands.failures import start_failure
from app.commands.tls_flags import add_tls_arguments, tls_overrides
from app.config import load_config
from common.config import LISTEN_HELP
from common.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="URL",
        help="a TGI, vLLM or SGLang server, its engine found by probing (repeat for a pool)",
    )
    parser.add_argument("--model-id", help="the model the --backend servers serve (default: 'default')")
    parser.add_argument(
        "--tokenizer-file",
        metavar="PATH",
        help="the tokenizer.json the --backend servers load: TGIS input counts without a /tokenize call",
    )
    parser.add_argument("--grpc-listen", metavar="HOST:PORT", help="the gRPC API (default 0.0.0.0:8033)")
    parser.add_argument(
        "--http-listen", metavar="HOST:PORT", help=f"the HTTP API: {LISTEN_HELP} (default 0.0.0.0:8080)"
    )
    parser.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default sqlite:///joulegate.db)")
    parser.add_argument(
        "--meter", choices=["auto", "nvml", "sim", "none"], help="energy source of the in-process meter (default auto)"
    )
    parser.add_argument("--log-format", choices=["json", "console"])
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="gateway processes sharing the listeners (SO_REUSEPORT), one meter for the host; N > 1 needs "
        "PostgreSQL (default: server.workers, 1)",
    )
    # a child of `--workers N` (app.workers): "worker-<i>" or "meter", its configuration as JSON on stdin
    parser.add_argument("--role", help=argparse.SUPPRESS)
    add_tls_arguments(parser)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags as config overrides (they win over the file and the environment)."""
    out: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if args.grpc_listen is not None:
        server["grpc_listen"] = args.grpc_listen
    if args.http_listen is not None:  # "" is a value: it turns the listener off, as in the file and the environment
        server["http_listen"] = args.http_listen
    if getattr(args, "log_format", None):
        server["log_format"] = args.log_format
    if getattr(args, "workers", None) is not None:
        server["workers"] = args.workers
    if server:
        out["server"] = server
    if args.db:
        out["db"] = {"url": args.db}
    if args.meter:
        out["meter"] = {"source": args.meter}
    if args.backend:
        model: dict[str, Any] = {"model_id": args.model_id or "default", "backends": [{"url": u} for u in args.backend]}
        if getattr(args, "tokenizer_file", None):
            model["tokenizer_file"] = args.tokenizer_file
        out["models"] = [model]
    elif args.model_id or getattr(args, "tokenizer_file", None):
        raise ConfigError("--model-id and --tokenizer-file need at least one --backend URL")
    return {**out, **tls_overrides(args)}


def run(args: argparse.Namespace) -> int:
    from common.logs import configure_logging
    from proxy.request_log import set_request_log

    if getattr(args, "role", None):
        return _run_child(args.role)
    config = load_config(args.config, overrides=overrides_from_args(args))
    if not config.models:
        raise ConfigError("no backends: give --backend URL or [[models]] in the config file")
    check_db_url(config.db.url, must_exist=False, origin=url_origin(args))  # the gateway creates a new SQLite file
    configure_logging(config.server.log_level, config.server.log_format)
    set_request_log(config.server.request_log)
    if config.server.workers > 1:
        from app.workers import check_workers_db, supervise

        check_workers_db(config)
        try:
            return supervise(config)
        except Exception as exc:
            failure = start_failure(exc, config.db.url, f"--meter {config.meter.source}")
            if failure is None:
                raise
            raise failure from None
    from app.server import GatewayApp
    from app.workers import adopt_orphan_journals
    from common.loop import run as run_loop

    async def main() -> None:
        # built inside the running loop: grpc.aio objects bind to the loop that creates them
        await GatewayApp(config).run_until_signalled()

    try:
        adopt_orphan_journals(config, 1)  # what an earlier `--workers N` left in worker journals 1.. (usually none)
        run_loop(main(), config.server.event_loop)
    except Exception as exc:
        failure = start_failure(exc, config.db.url, f"--meter {config.meter.source}")
        if failure is None:
            raise
        raise failure from None
    return 0


def _run_child(role: str) -> int:
    """A worker or the meter of ``--workers N``: the supervisor's validated configuration comes on stdin."""
    import sys

    from app.config import Config
    from app.workers import run_child
    from common.logs import configure_logging
    from proxy.request_log import set_request_log

    config = Config.model_validate_json(sys.stdin.buffer.read())
    configure_logging(config.server.log_level, config.server.log_format)
    set_request_log(config.server.request_log)
    try:
        return run_child(role, config)
    except Exception as exc:
        failure = start_failure(exc, config.db.url, f"--meter {config.meter.source}")
        if failure is None:
            raise
        raise failure from None
