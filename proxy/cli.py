"""The ``joulegate`` command: a thin dispatcher to the module that owns each subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when its
command runs, so ``joulegate sim-tgi`` never loads the gateway and ``joulegate keys`` never loads gRPC.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("proxy.commands.serve", "run the gateway (gRPC + HTTP), with an in-process meter unless --meter none"),
    "meter": ("proxy.commands.meter", "run the metering daemon alone (sampler, attribution, reports)"),
    "keys": ("proxy.commands.keys", "create, list and revoke API keys"),
    "migrate": ("proxy.commands.migrate", "create or upgrade the database schema (Alembic)"),
    "report": ("proxy.commands.report", "print energy reports: usage, requests, backends"),
    "sim-tgi": ("sim.cli", "run a simulated TGI server with a simulated GPU energy counter"),
    "demo": ("proxy.commands.demo", "the whole stack on simulated GPUs: traffic from two tenants, then their energy"),
}


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="joulegate", description="Energy-metering gRPC gateway for TGI.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser, {name: module for name, (module, _) in COMMANDS.items()}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, modules = build_parser()
    if not argv or argv[0] not in modules:
        parser.parse_args(argv)  # prints usage and exits
        return 2
    name = argv[0]
    module = importlib.import_module(modules[name])
    sub = argparse.ArgumentParser(prog=f"joulegate {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
