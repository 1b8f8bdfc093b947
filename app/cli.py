"""The ``joulegate`` command: a thin dispatcher to the module that owns each subcommand.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int`` and is imported only when its
command runs, so ``joulegate sim-tgi`` never loads the gateway and ``joulegate keys`` never loads gRPC.

Every failure ends as one line on stderr, ``joulegate COMMAND: what was wrong and what to do``, and a non-zero exit:
2 for a bad argument or setting (``ConfigError``, a ``CommandError`` of exit code 2), 1 for a failure while running,
130 for Ctrl-C. An error no command anticipated is a bug: one line as well, and its traceback with ``--traceback``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version

# command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("app.commands.serve", "run the gateway (gRPC + HTTP), with an in-process meter unless --meter none"),
    "meter": ("app.commands.meter", "run the metering daemon alone (sampler, attribution, reports)"),
    "keys": ("app.commands.keys", "create, list, rotate and revoke API keys"),
    "audit": (
        "app.commands.audit",
        "who created, rotated or revoked keys, changed billing settings, read as admin",
    ),
    "migrate": ("app.commands.migrate", "create or upgrade the database schema (Alembic)"),
    "report": ("app.commands.report", "print energy reports: usage, requests, backends"),
    "export": ("app.commands.export", "send final per-request energy as CloudEvents to a billing pipeline"),
    "whatif": (
        "app.commands.whatif",
        "replay recorded traffic on simulated backends under other placement and shaping policies",
    ),
    "sim": ("sim.cli", "run a simulated engine server (--engine tgi|vllm|sglang) with a simulated GPU energy counter"),
    "sim-tgi": ("sim.cli", "run a simulated TGI server with a simulated GPU energy counter"),
    "demo": ("app.commands.demo", "the whole stack on simulated GPUs: traffic from two tenants, then their energy"),
}


def version() -> str:
    """The installed package's version (pyproject.toml)."""
    try:
        return package_version("joulegate")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="joulegate", description="Energy-metering gRPC gateway for TGI.")
    parser.add_argument("--version", action="version", version=f"joulegate {version()}")
    parser.add_argument(
        "--traceback", action="store_true", help="print the full traceback of an unexpected error (for bug reports)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser, {name: module for name, (module, _) in COMMANDS.items()}


def _first_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return text[:500] or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    from app.commands.database import CommandError
    from app.config import ConfigError
    from common.errors import SchemaMismatchError

    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = bool(argv) and argv[0] == "--traceback"
    if show_traceback:
        argv = argv[1:]
    parser, modules = build_parser()
    if not argv or argv[0] not in modules:
        parser.parse_args(argv)  # prints usage (or the version) and exits
        return 2
    name = argv[0]
    module = importlib.import_module(modules[name])
    sub = argparse.ArgumentParser(prog=f"joulegate {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except (ConfigError, SchemaMismatchError) as exc:
        print(f"joulegate {name}: {exc}", file=sys.stderr)
        return 2
    except CommandError as exc:
        print(f"joulegate {name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"joulegate {name}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if show_traceback:
            traceback.print_exc()
        print(
            f"joulegate {name}: unexpected error: {type(exc).__name__}: {_first_line(exc)} "
            f"(a bug: `joulegate --traceback {name} ...` prints where it happened)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
