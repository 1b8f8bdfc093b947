"""Programmatic Alembic: bring a database to the newest schema, or ask which revision it is at.

The Alembic ``Config`` is built in code and points at the migrations shipped inside the installed package
(``meter/migrations``), so neither a working directory nor an alembic.ini is needed at runtime.
On PostgreSQL an advisory lock serialises concurrent upgrades (several gateway replicas starting at once).
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
import structlog
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from common.errors import SchemaMismatchError
from meter.store.db import make_engine

log = structlog.get_logger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
_PG_LOCK_KEY = 0x6A6F756C65  # "joule": arbitrary, constant across versions


def alembic_config(connection: sa.Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision shipped with this version of joulegate."""
    rev = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert rev is not None
    return rev


def _as_engine(url_or_engine: str | sa.Engine) -> tuple[sa.Engine, bool]:
    if isinstance(url_or_engine, sa.Engine):
        return url_or_engine, False
    return make_engine(url_or_engine), True


def upgrade(url: str | sa.Engine) -> None:
    """``alembic upgrade head`` on ``url`` (a URL or an engine). Idempotent; safe to run from several processes.

    Concurrent upgrades are serialised: on PostgreSQL by an advisory lock, on SQLite by running the whole upgrade
    in one ``BEGIN IMMEDIATE`` transaction (the driver would otherwise run the DDL outside any transaction).
    """
    engine, owned = _as_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                _upgrade_sqlite(conn)
            elif conn.dialect.name == "postgresql":
                _upgrade_postgres(conn)
            else:
                _upgrade(conn)
    finally:
        if owned:
            engine.dispose()


def _upgrade(conn: sa.Connection) -> None:
    """Run the upgrade inside the connection's current transaction (alembic joins it) and commit."""
    before = MigrationContext.configure(conn).get_current_revision()
    command.upgrade(alembic_config(conn), "head")
    after = MigrationContext.configure(conn).get_current_revision()
    conn.commit()
    if before != after:
        log.info("schema_upgraded", from_revision=before, to_revision=after)


def _upgrade_postgres(conn: sa.Connection) -> None:
    conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
    conn.commit()
    try:
        _upgrade(conn)
    finally:
        conn.rollback()
        conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
        conn.commit()


def _upgrade_sqlite(conn: sa.Connection) -> None:
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    saved = dbapi.isolation_level
    dbapi.isolation_level = None  # we issue BEGIN ourselves
    try:
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # waits (busy timeout) for another upgrader to finish
        try:
            _upgrade(conn)
        except BaseException:
            conn.rollback()
            raise
    finally:
        dbapi.isolation_level = saved


def current(url: str | sa.Engine) -> str | None:
    """The revision the database is at; None for a database Alembic never touched (no schema)."""
    engine, owned = _as_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        if owned:
            engine.dispose()


def ensure_schema(url: str | sa.Engine) -> str:
    """Create the schema when the database has none; refuse one this version cannot write to. Returns its revision.

    An existing schema is never upgraded here: a fleet upgrades once, on purpose (``joulegate migrate``, the
    migration Job), not from whichever replica starts first.

    Raises ``SchemaMismatchError`` for an older revision (the ledger's writes and the engine's reads would fail on
    what the schema lacks, every second, behind a process that looks alive), and for one this version does not know
    (a newer joulegate migrated the database) unless that schema says code as old as this may still write to it
    (``schema_compat``: a rolling upgrade's old pods go on).
    """
    engine, owned = _as_engine(url)
    try:
        rev = current(engine)
        if rev is None:
            upgrade(engine)
            rev = current(engine)
            assert rev is not None
        if rev != head():
            with engine.connect() as conn:
                check_revision(rev, _oldest_writer(conn))
    finally:
        if owned:
            engine.dispose()
    return rev


def _oldest_writer(conn: sa.Connection) -> str | None:
    if not sa.inspect(conn).has_table("schema_compat"):
        return None
    return conn.execute(sa.text("SELECT MAX(oldest_writer) FROM schema_compat")).scalar()


def check_revision(rev: str, oldest_writer: str | None) -> None:
    """Nothing if this version may write to a schema at ``rev`` (its head, or a newer one whose ``oldest_writer``
    this head reaches); else ``SchemaMismatchError`` saying what to run."""
    newest = head()
    if rev == newest:
        return
    known = {s.revision for s in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if rev in known:
        raise SchemaMismatchError(
            f"the database's schema is at revision {rev} and this joulegate needs {newest}: "
            "run `joulegate migrate` with the same --db or --config (in a fleet, the migration Job), then start again"
        )
    if oldest_writer is not None and oldest_writer in known:
        log.warning("schema_newer_but_compatible", revision=rev, this_version=newest, oldest_writer=oldest_writer)
        return
    raise SchemaMismatchError(
        f"the database's schema is at revision {rev}, which this joulegate (newest revision {newest}) does not know, "
        f"and it takes writes from revision {oldest_writer or rev} on: a newer joulegate migrated it; run that version"
    )
