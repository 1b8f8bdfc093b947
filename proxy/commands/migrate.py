"""``joulegate migrate``: create or upgrade the database schema to the newest revision (Alembic)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqlalchemy.engine import make_url

from proxy.config import ConfigError, load_config


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--db``, shared by the commands that only need the database."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file (db.url is read from it)")
    parser.add_argument("--db", metavar="URL", help="database URL; wins over the config file and JOULEGATE_DB__URL")


def resolve_db_url(args: argparse.Namespace) -> str:
    """The database URL: --db, else the config file / environment, else the default (sqlite:///joulegate.db)."""
    overrides: dict[str, Any] = {"db": {"url": args.db}} if getattr(args, "db", None) else {}
    return load_config(getattr(args, "config", None), overrides=overrides).db.url


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable url>"


class _CurrentStderr:
    """Whatever ``sys.stderr`` is at the time of writing (it is swapped under test runners)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def logs_to_stderr() -> None:
    """Keep stdout for the command's own output (scripts parse it): a structlog that prints to stdout (its default
    logger factory) is pointed at stderr; any other logging set-up is left alone."""
    import structlog

    factory = structlog.get_config()["logger_factory"]
    if isinstance(factory, structlog.PrintLoggerFactory) and getattr(factory, "_file", None) in (None, sys.stdout):
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()))  # type: ignore[arg-type]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from meter.store.migrate import current, upgrade

    logs_to_stderr()
    try:
        url = resolve_db_url(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        before = current(url)
        upgrade(url)
        after = current(url)
    except Exception as exc:
        print(f"joulegate migrate: {redact(url)}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    change = "already at" if before == after else f"upgraded from {before or 'an empty database'} to"
    print(f"{redact(url)}: {change} revision {after}")
    return 0
