"""``joulegate migrate``: create or upgrade the database schema to the newest revision (Alembic).

The one administrative command that may create a SQLite file: creating the database is its job.
"""

from __future__ import annotations

import argparse

from app.commands.database import add_db_arguments, db_failure, open_database, redact


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_db_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from common.logs import logs_to_stderr
    from meter.store.migrate import current, upgrade

    logs_to_stderr()
    url, engine = open_database(args, must_exist=False)
    try:
        before = current(engine)
        upgrade(engine)
        after = current(engine)
    except Exception as exc:
        raise db_failure(exc, url) from None
    finally:
        engine.dispose()
    change = "already at" if before == after else f"upgraded from {before or 'an empty database'} to"
    print(f"{redact(url)}: {change} revision {after}")
    return 0
