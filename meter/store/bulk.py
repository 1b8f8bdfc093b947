"""Bulk, idempotent upserts of request rows and counter samples: the ledger's SQL, one fast path per dialect.

Rows come in as plain tuples in the column orders below (the cheapest thing to build on a busy writer thread),
already folded to one row per key. The statements are SQLAlchemy dialect inserts (``sqlite.insert`` /
``postgresql.insert`` with ``on_conflict_do_nothing`` / ``on_conflict_do_update``), compiled once:

- SQLite: the DB-API's own ``executemany`` over tuples (C loop, one prepared statement).
- PostgreSQL: ``COPY ... FROM STDIN (FORMAT BINARY)`` into per-session temporary staging tables, then one
  ``INSERT ... SELECT ... ON CONFLICT`` per table. Measured on this project's 2-core box this is about 2.5x faster
  than psycopg's pipelined ``executemany`` of the same upsert (which pays per-row protocol and executor start-up
  costs), and it keeps the per-row Python work to building one tuple. The staging tables are created with
  ``IF NOT EXISTS`` in every transaction, so this also works behind a transaction-pooling PgBouncer.

Semantics, the same on both dialects:

- starts: INSERT ... ON CONFLICT (request_id) DO NOTHING, so a start never regresses a finished row;
- timelines: INSERT ... ON CONFLICT (request_id) DO UPDATE ... WHERE any column IS DISTINCT FROM the new value,
  so rewriting an identical row changes nothing, ``ingested_ns`` included;
- samples: INSERT ... ON CONFLICT (device, t_ns) DO NOTHING.

Every request row written or changed gets ``ingested_ns = now_ns`` (one value per batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine.interfaces import DBAPIModule

from meter.store.models import Request, Sample, table_of

# Row layouts (tuple orders). ``ingested_ns`` is not part of a row: the writer adds it.
START_COLUMNS = ("request_id", "tenant", "model_id", "backend", "received_ns", "released_ns")
TIMELINE_COLUMNS = (
    "request_id",
    "tenant",
    "model_id",
    "backend",
    "traffic_class",
    "api",
    "status",
    "correlation_id",
    "received_ns",
    "released_ns",
    "first_token_ns",
    "done_ns",
    "prompt_tokens",
    "prompt_tokens_estimated",
    "generated_tokens",
    "cached_tokens",
)
SAMPLE_COLUMNS = ("device", "t_ns", "energy_mj", "error")

Row = tuple[Any, ...]

_REQUESTS = table_of(Request)
_SAMPLES = table_of(Sample)
_COMPARED = TIMELINE_COLUMNS[1:]  # a timeline changes a row iff one of these differs


def _timeline_upsert(insert_stmt: Any) -> Any:
    excluded = insert_stmt.excluded
    return insert_stmt.on_conflict_do_update(
        index_elements=["request_id"],
        set_={c: excluded[c] for c in (*_COMPARED, "ingested_ns")},
        where=sa.or_(*(_REQUESTS.c[c].is_distinct_from(excluded[c]) for c in _COMPARED)),
    )


class BulkWriter:
    """Writes folded batches of starts, timelines and samples inside a caller's transaction."""

    def write(
        self, conn: sa.Connection, starts: Sequence[Row], timelines: Sequence[Row], samples: Sequence[Row], now_ns: int
    ) -> None:
        raise NotImplementedError

    @staticmethod
    def for_dialect(dialect: sa.Dialect) -> BulkWriter:
        if dialect.name == "sqlite":
            return SqliteBulkWriter(dialect)
        if dialect.name == "postgresql":
            return PostgresBulkWriter(dialect)
        raise ValueError(f"unsupported database dialect {dialect.name!r} (joulegate supports sqlite and postgresql)")


def _positional_sql(stmt: Any, dialect: sa.Dialect, order: Sequence[str]) -> str:
    compiled = stmt.compile(dialect=dialect)
    if tuple(compiled.positiontup or ()) != tuple(order):  # the tuples we pass must match the placeholders
        raise AssertionError(f"unexpected parameter order {compiled.positiontup} != {tuple(order)}")
    return str(compiled)


class SqliteBulkWriter(BulkWriter):
    def __init__(self, dialect: sa.Dialect) -> None:
        start_cols = (*START_COLUMNS, "prompt_tokens", "generated_tokens", "ingested_ns")
        timeline_cols = (*TIMELINE_COLUMNS, "ingested_ns")
        start = sqlite.insert(_REQUESTS).values({c: sa.bindparam(c) for c in start_cols})
        timeline = sqlite.insert(_REQUESTS).values({c: sa.bindparam(c) for c in timeline_cols})
        sample = sqlite.insert(_SAMPLES).values({c: sa.bindparam(c) for c in SAMPLE_COLUMNS})
        self._start_sql = _positional_sql(
            start.on_conflict_do_nothing(index_elements=["request_id"]), dialect, start_cols
        )
        self._timeline_sql = _positional_sql(_timeline_upsert(timeline), dialect, timeline_cols)
        self._sample_sql = _positional_sql(
            sample.on_conflict_do_nothing(index_elements=["device", "t_ns"]), dialect, SAMPLE_COLUMNS
        )

    def write(
        self, conn: sa.Connection, starts: Sequence[Row], timelines: Sequence[Row], samples: Sequence[Row], now_ns: int
    ) -> None:
        if starts:
            conn.exec_driver_sql(self._start_sql, [(*r, 0, 0, now_ns) for r in starts])
        if timelines:
            conn.exec_driver_sql(self._timeline_sql, [(*r, now_ns) for r in timelines])
        if samples:
            conn.exec_driver_sql(self._sample_sql, list(samples))


class PostgresBulkWriter(BulkWriter):
    _STAGE = {"starts": "jg_stage_starts", "timelines": "jg_stage_timelines", "samples": "jg_stage_samples"}

    def __init__(self, dialect: sa.Dialect) -> None:
        meta = sa.MetaData()
        stages = {
            "starts": (START_COLUMNS, _REQUESTS),
            "timelines": (TIMELINE_COLUMNS, _REQUESTS),
            "samples": (SAMPLE_COLUMNS, _SAMPLES),
        }
        self._stage_tables: dict[str, sa.Table] = {}
        ddl: list[str] = []
        self._copy_sql: dict[str, str] = {}
        self._copy_types: dict[str, list[str]] = {}
        for name, (cols, target) in stages.items():
            stage = sa.Table(
                self._STAGE[name], meta, *(sa.Column(c, target.c[c].type) for c in cols), prefixes=["TEMPORARY"]
            )
            self._stage_tables[name] = stage
            create = str(sa.schema.CreateTable(stage, if_not_exists=True).compile(dialect=dialect)).strip()
            ddl.append(f"{create} ON COMMIT DELETE ROWS")
            self._copy_sql[name] = f"COPY {stage.name} ({', '.join(cols)}) FROM STDIN (FORMAT BINARY)"
            self._copy_types[name] = [_pg_type(target, c) for c in cols]
        self._ddl = ";\n".join(ddl)

        now = sa.bindparam("now_ns", type_=sa.BigInteger)
        st = self._stage_tables["starts"]
        self._start = (
            postgresql.insert(_REQUESTS)
            .from_select(
                [*START_COLUMNS, "prompt_tokens", "generated_tokens", "ingested_ns"],
                sa.select(*(st.c[c] for c in START_COLUMNS), sa.literal(0), sa.literal(0), now),
            )
            .on_conflict_do_nothing(index_elements=["request_id"])
        )
        tt = self._stage_tables["timelines"]
        self._timeline = _timeline_upsert(
            postgresql.insert(_REQUESTS).from_select(
                [*TIMELINE_COLUMNS, "ingested_ns"], sa.select(*(tt.c[c] for c in TIMELINE_COLUMNS), now)
            )
        )
        ss = self._stage_tables["samples"]
        self._sample = (
            postgresql.insert(_SAMPLES)
            .from_select(list(SAMPLE_COLUMNS), sa.select(*(ss.c[c] for c in SAMPLE_COLUMNS)))
            .on_conflict_do_nothing(index_elements=["device", "t_ns"])
        )

    def _copy(self, cursor: Any, name: str, rows: Sequence[Row]) -> None:
        with cursor.copy(self._copy_sql[name]) as copy:
            copy.set_types(self._copy_types[name])
            write_row = copy.write_row
            for r in rows:
                write_row(r)

    def write(
        self, conn: sa.Connection, starts: Sequence[Row], timelines: Sequence[Row], samples: Sequence[Row], now_ns: int
    ) -> None:
        if not (starts or timelines or samples):
            return
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        cursor = dbapi_conn.cursor()
        statement = self._ddl
        try:
            cursor.execute(self._ddl)
            for name, rows in (("starts", starts), ("timelines", timelines), ("samples", samples)):
                if rows:
                    statement = self._copy_sql[name]
                    self._copy(cursor, name, rows)
        except conn.dialect.loaded_dbapi.Error as err:
            raise _wrapped(conn, err, statement, cursor) from err
        finally:
            cursor.close()
        if starts:
            conn.execute(self._start, {"now_ns": now_ns})
        if timelines:
            conn.execute(self._timeline, {"now_ns": now_ns})
        if samples:
            conn.execute(self._sample)


def _wrapped(conn: sa.Connection, err: DBAPIModule.Error, statement: str, cursor: Any) -> sa.exc.DBAPIError:
    """A driver error raised outside SQLAlchemy's execution path (COPY), as SQLAlchemy would have raised it:
    the matching ``sa.exc`` class (OperationalError, DataError...), and a dead connection invalidated."""
    dialect = conn.dialect
    disconnect = dialect.is_disconnect(err, conn.connection.dbapi_connection, cursor)
    if disconnect:
        conn.invalidate(err)
    wrapped = sa.exc.DBAPIError.instance(
        statement, None, err, dialect.loaded_dbapi.Error, connection_invalidated=disconnect, dialect=dialect
    )
    assert isinstance(wrapped, sa.exc.DBAPIError)
    return wrapped


def _pg_type(table: sa.Table, column: str) -> str:
    t = table.c[column].type
    if isinstance(t, sa.Boolean):
        return "bool"
    if isinstance(t, sa.BigInteger):
        return "int8"
    if isinstance(t, sa.Integer):
        return "int4"
    if isinstance(t, sa.String):
        return "varchar"
    raise TypeError(f"no COPY type for {table.name}.{column}: {t!r}")
