"""The database a command is pointed at: ``--config``/``--db``, the URL checked before anything connects, and every
failure to reach it as one line that says what to do.

Why check before connecting: SQLAlchemy turns a mistyped URL into a traceback (``ArgumentError``), an unsupported
database into a ``ModuleNotFoundError`` for a driver joulegate never uses, and a mistyped SQLite path into a new,
empty database file — where ``report`` would print an empty bill and ``keys create`` would store a key that no
gateway reads. So the commands that only read or administer a database (``report``, ``keys``) refuse a SQLite file
that does not exist; ``migrate`` (whose job is to create the schema) and the servers may create one.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import URL

from app.config import load_config
from common.errors import JoulegateError, SchemaMismatchError

SUPPORTED = "sqlite:///PATH or postgresql://USER@HOST[:PORT]/DATABASE"


class CommandError(JoulegateError):
    """A command cannot go on. The message says what was wrong and what to do; ``exit_code`` is 2 for a bad
    argument or setting and 1 for a failure met while running."""

    def __init__(self, message: str, *, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config`` and ``--db``, shared by the commands that only need the database."""
    parser.add_argument("--config", metavar="FILE", help="TOML config file (db.url is read from it)")
    parser.add_argument("--db", metavar="URL", help="database URL; wins over the config file and JOULEGATE_DB__URL")


def resolve_db_url(args: argparse.Namespace) -> str:
    """The database URL: --db, else the config file / environment, else the default (sqlite:///joulegate.db)."""
    overrides: dict[str, Any] = {"db": {"url": args.db}} if getattr(args, "db", None) else {}
    return load_config(getattr(args, "config", None), overrides=overrides).db.url


def url_origin(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> str:
    """Where the command's database URL was set (the errors name it, so the operator knows what to fix)."""
    if getattr(args, "db", None):
        return "--db"
    if (os.environ if environ is None else environ).get("JOULEGATE_DB__URL"):
        return "JOULEGATE_DB__URL"
    if getattr(args, "config", None):
        return f"db.url in {args.config}"
    return "the default db.url; set --db, db.url or JOULEGATE_DB__URL"


def redact(url: str | URL) -> str:
    """The URL without its password (safe to print)."""
    from meter.store.db import normalize_url

    try:
        parsed = normalize_url(url) if isinstance(url, str) else url
        return parsed.render_as_string(hide_password=True).replace("postgresql+psycopg://", "postgresql://", 1)
    except Exception:
        return "<unparsable url>"


def check_db_url(url: str, *, must_exist: bool, origin: str) -> URL:
    """Parse and check ``url`` (set by ``origin``) without connecting: a supported database whose driver is
    installed, and for SQLite a directory that exists (and, with ``must_exist``, the file itself). Raises
    ``CommandError``."""
    from meter.store.db import normalize_url

    try:
        parsed = normalize_url(url)
    except Exception:
        raise CommandError(
            f"database URL {url!r} is not a URL: expected {SUPPORTED} (from {origin})", exit_code=2
        ) from None
    shown = f"database URL {redact(parsed)} (from {origin})"
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise CommandError(
            f"{shown}: {backend!r} is not supported; joulegate stores its data in {SUPPORTED}", exit_code=2
        )
    try:
        parsed.get_dialect().import_dbapi()
    except Exception as exc:  # an unknown driver (NoSuchModuleError) or one that is not installed (ImportError)
        raise CommandError(
            f"{shown}: driver {parsed.drivername!r} is not available ({exc}); use {SUPPORTED} (psycopg 3)",
            exit_code=2,
        ) from None
    if backend == "sqlite" and parsed.database not in (None, "", ":memory:") and parsed.query.get("mode") != "memory":
        path = Path(parsed.database).expanduser()
        if not path.parent.is_dir():
            raise CommandError(f"{shown}: directory {path.parent} does not exist (a typo in the path?)", exit_code=2)
        if must_exist and not path.is_file():
            raise CommandError(
                f"no database file at {path.resolve()} ({shown}): check the path, or create the database with "
                f"`joulegate migrate --db {redact(parsed)}`",
            )
    return parsed


def db_failure(exc: BaseException, url: str) -> CommandError:
    """One line for an error met while talking to the database at ``url``."""
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None:
        detail = str(exc.orig)
    else:
        detail = str(exc) or type(exc).__name__
    detail = " ".join(line.strip() for line in detail.strip().splitlines() if line.strip())[:400]
    if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError | sa.exc.TimeoutError | OSError):
        return CommandError(f"cannot use the database {redact(url)}: {detail}")
    if isinstance(exc, SchemaMismatchError):
        return CommandError(f"database {redact(url)}: {detail}", exit_code=2)
    return CommandError(f"database {redact(url)}: {type(exc).__name__}: {detail}")


def open_database(args: argparse.Namespace, *, must_exist: bool) -> tuple[str, sa.Engine]:
    """The checked URL of the command's database and an engine on it that has connected once (so an unreachable
    database fails here, as one line, and not in the middle of the command's work)."""
    from meter.store.db import make_engine

    url = resolve_db_url(args)
    check_db_url(url, must_exist=must_exist, origin=url_origin(args))
    engine = make_engine(url)
    try:
        with engine.connect():
            pass
    except Exception as exc:
        engine.dispose()
        raise db_failure(exc, url) from None
    return url, engine
