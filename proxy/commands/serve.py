"""``joulegate serve``: the gateway process (gRPC on 8033, HTTP on 8080), with an in-process meter if asked."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from proxy.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML configuration file")
    parser.add_argument(
        "--backend", action="append", default=[], metavar="URL", help="a TGI server (repeat for a pool)"
    )
    parser.add_argument("--model-id", help="the model the --backend servers serve (default: 'default')")
    parser.add_argument("--grpc-listen", metavar="HOST:PORT", help="default 0.0.0.0:8033")
    parser.add_argument("--http-listen", metavar="HOST:PORT", help="default 0.0.0.0:8080; 'off' disables it")
    parser.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default sqlite:///joulegate.db)")
    parser.add_argument(
        "--meter", choices=["auto", "nvml", "sim", "none"], help="energy source of the in-process meter (default auto)"
    )
    parser.add_argument("--log-format", choices=["json", "console"])


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Command-line flags as config overrides (they win over the file and the environment)."""
    out: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if args.grpc_listen:
        server["grpc_listen"] = args.grpc_listen
    if args.http_listen:
        server["http_listen"] = None if args.http_listen == "off" else args.http_listen
    if getattr(args, "log_format", None):
        server["log_format"] = args.log_format
    if server:
        out["server"] = server
    if args.db:
        out["db"] = {"url": args.db}
    if args.meter:
        out["meter"] = {"source": args.meter}
    if args.backend:
        out["models"] = [{"model_id": args.model_id or "default", "backends": [{"url": u} for u in args.backend]}]
    elif args.model_id:
        raise ConfigError("--model-id needs at least one --backend URL")
    return out


def run(args: argparse.Namespace) -> int:
    from proxy.logs import configure_logging

    try:
        config = load_config(args.config, overrides=overrides_from_args(args))
    except ConfigError as exc:
        print(f"joulegate serve: {exc}", file=sys.stderr)
        return 2
    if not config.models:
        print("joulegate serve: no backends: give --backend URL or [[models]] in the config file", file=sys.stderr)
        return 2
    configure_logging(config.server.log_level, config.server.log_format)
    from proxy.server import GatewayApp

    async def main() -> None:
        # built inside the running loop: grpc.aio objects bind to the loop that creates them
        await GatewayApp(config).run_until_signalled()

    asyncio.run(main())
    return 0
