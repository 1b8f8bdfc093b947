"""Engines for joulegate's SQL store: SQLite (one box) and PostgreSQL via psycopg 3 (fleets).

The store is used through a *synchronous* SQLAlchemy engine: the ledger writes from its own thread and async
callers run queries with ``asyncio.to_thread``. A sync engine keeps one code path for both dialects and lets
psycopg's pipelined ``executemany`` carry bulk upserts.

SQLite runs in WAL mode (readers never block the writer, and the other way round) with ``synchronous=NORMAL``
(a commit is durable against an application crash at once and against power loss at the next checkpoint, which is
the documented trade-off for WAL), a busy timeout so that concurrent writers wait instead of failing, and foreign
keys enforced (SQLite leaves them off by default).

PostgreSQL connections carry a connect timeout, TCP keepalives and a TCP user timeout, so that a database that
vanishes (a dead host, a cut network) surfaces as an ``OperationalError`` within seconds instead of a hang: the
ledger turns that error into journaling, and key lookups into serving cached keys.

``is_outage`` tells the two kinds of failure apart for every caller: the database is away or not ready (retry
later, nothing is wrong with what was sent), or it refused what was sent (retrying the same thing cannot help).
Mistaking the second for the first makes a writer retry one bad row for ever.
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import StaticPool

SQLITE_BUSY_TIMEOUT_MS = 10_000
PG_CONNECT_TIMEOUT_S = 5
PG_TCP_USER_TIMEOUT_MS = 20_000  # unacknowledged data older than this kills the connection (Linux)


# PostgreSQL SQLSTATE classes that mean "not now" rather than "never": connection exception, invalid authorization
# (credentials being rotated), invalid catalog name (the database is not created yet), transaction rollback
# (serialization failure, deadlock), insufficient resources (disk full, too many connections), object not in
# prerequisite state (lock not available), operator intervention (admin shutdown, cannot connect now, statement
# timeout), system error (I/O), internal error. Plus an undefined table or column: the schema is not migrated yet.
# Everything else with a SQLSTATE (22 data exception, 23 integrity, 54 program limit such as an index row too large,
# 42 other than the two below) is about what was sent.
_OUTAGE_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "40", "53", "55", "57", "58", "XX"})
_OUTAGE_SQLSTATES = frozenset({"42P01", "42703"})


def is_outage(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable or not ready (retry later) rather than that it refused the
    statement's data. A PostgreSQL error is judged by its SQLSTATE (psycopg files some data errors, e.g. 54000
    "index row size exceeds maximum", under ``OperationalError``); one without (SQLite, a failed connect) by its
    class. Errors raised outside the driver's error hierarchy while binding values (``UnicodeEncodeError`` for a
    lone surrogate, ``OverflowError`` for a huge int) are data errors; ``OSError`` (timeouts included) is an outage.
    """
    if isinstance(exc, sa.exc.DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate:
            return sqlstate in _OUTAGE_SQLSTATES or sqlstate[:2] in _OUTAGE_SQLSTATE_CLASSES
        return exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError)
    return isinstance(exc, sa.exc.DisconnectionError | sa.exc.TimeoutError | OSError)


def normalize_url(url: str | URL) -> URL:
    """Map ``postgres://`` and ``postgresql://`` (libpq style, as Heroku/k8s secrets write them) to psycopg 3."""
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _is_memory_sqlite(url: URL) -> bool:
    return url.database in (None, "", ":memory:") or (url.query.get("mode") == "memory")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        _ensure_wal(cursor)
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _ensure_wal(cursor: Any) -> None:
    """Put the file in WAL mode (persistent: only its first connection ever changes it).

    Switching needs an exclusive lock, and SQLite answers "database is locked" at once — without calling the busy
    handler — while another connection holds a transaction on the file (a concurrent upgrader, the ledger's writer).
    So the switch is retried within the busy timeout; a file already in WAL mode needs no lock at all.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        mode = cursor.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() in ("wal", "memory"):
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def make_engine(url: str | URL, **kw: Any) -> sa.Engine:
    """A sync engine for ``url`` with joulegate's connection settings; ``kw`` overrides ``create_engine`` arguments.

    ``connect_args`` given in ``kw`` are merged over the defaults (e.g. ``connect_args={"connect_timeout": 1}``).
    """
    parsed = normalize_url(url)
    backend = parsed.get_backend_name()
    connect_args: dict[str, Any] = {}
    options: dict[str, Any] = {}
    if backend == "sqlite":
        # SQLAlchemy's pysqlite dialect already uses a QueuePool for files; threads share connections safely
        # because a pooled connection is used by one thread at a time.
        connect_args["check_same_thread"] = False
        if _is_memory_sqlite(parsed):
            options["poolclass"] = StaticPool  # one in-memory database shared by every thread
    elif backend == "postgresql":
        connect_args.update(
            connect_timeout=PG_CONNECT_TIMEOUT_S,
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
            tcp_user_timeout=PG_TCP_USER_TIMEOUT_MS,
            application_name="joulegate",
        )
        options.update(pool_size=5, max_overflow=5, pool_timeout=10, pool_recycle=1800)
    options["pool_pre_ping"] = True  # a connection that died while pooled is replaced, not handed out
    connect_args.update(kw.pop("connect_args", {}))
    options.update(kw)
    engine = sa.create_engine(parsed, connect_args=connect_args, **options)
    if backend == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine
