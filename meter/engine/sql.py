"""The engine's SQL: bulk reads of samples and request rows, the locked write transaction, bulk writes.

Plain SQL strings through ``exec_driver_sql`` (no ORM objects on the hot loop), written once with ``?`` placeholders
and turned into ``%s`` for psycopg. Request energy rows go in with ``COPY ... FROM STDIN (FORMAT BINARY)`` on
PostgreSQL and ``executemany`` on SQLite.

Writes of one (backend, epoch) happen in one transaction that first takes a lock: a transaction-scoped advisory lock
on PostgreSQL (so two meters that claim the same backend serialise instead of interleaving their read-modify-write of
``usage_hourly``), ``BEGIN IMMEDIATE`` on SQLite (the write lock up front, so the rows read inside the transaction
cannot change before it commits).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa

from meter.engine.calibrate import PowerModel

Row = tuple[Any, ...]
T = TypeVar("T")

# -- rows: what the engine reads and writes, by name (NamedTuples: still plain tuples for COPY and executemany) ----


class SampleRow(NamedTuple):
    device: str
    t_ns: int
    energy_mj: int | None  # None: a failed read


class RequestRow(NamedTuple):
    """A finished request as attribution needs it."""

    request_id: str
    backend: str
    tenant: str
    model_id: str
    received_ns: int
    released_ns: int
    first_token_ns: int | None
    done_ns: int
    prompt_tokens: int
    generated_tokens: int
    ingested_ns: int
    status: str | None
    cached_tokens: int = 0


class IngestedRow(NamedTuple):
    """A row written since the last pass: late for an attributed epoch, or a request that never reached a backend."""

    request_id: str
    backend: str | None
    released_ns: int | None
    done_ns: int | None
    ingested_ns: int
    tenant: str
    model_id: str
    received_ns: int
    prompt_tokens: int
    generated_tokens: int


class OpenRequests(NamedTuple):
    backend: str
    earliest_released_ns: int | None  # the earliest release of an open request not timed out yet
    timed_out: int | None  # how many were released before the timeout's cutoff


class EpochMark(NamedTuple):
    """Where an attributed epoch stands: its bounds, its last reading and when it was attributed."""

    epoch_start_ns: int
    epoch_end_ns: int
    last_reading_ns: int | None
    attributed_at_ns: int


class UsageContribution(NamedTuple):
    """What one stored ``request_energy`` row adds to ``usage_hourly``, with its request's fields."""

    received_ns: int
    tenant: str
    model_id: str
    done_ns: int | None
    prompt_tokens: int
    generated_tokens: int
    prefill_mj: int
    decode_mj: int
    active_ns: int


class PinnedRow(NamedTuple):
    """A sealed request's stored ``request_energy`` row in one epoch, with what usage needs of its request."""

    request_id: str
    prefill_mj: int
    decode_mj: int
    active_ns: int
    idle_time_mj: int
    idle_tokens_mj: int
    received_ns: int
    tenant: str
    model_id: str
    done_ns: int | None
    prompt_tokens: int
    generated_tokens: int


class WriterMark(NamedTuple):
    """A ledger's how-far mark (``ledger_writers``)."""

    writer_id: str
    name: str
    through_ns: int
    clock_offset_ns: int | None


class SealCandidate(NamedTuple):
    request_id: str
    released_ns: int
    done_ns: int
    ingested_ns: int


class RequestEnergyRow(NamedTuple):
    request_id: str
    epoch_start_ns: int
    backend: str
    prefill_mj: int
    decode_mj: int
    active_ns: int
    idle_time_mj: int
    idle_tokens_mj: int


class BackendEpochRow(NamedTuple):
    backend: str
    epoch_start_ns: int
    epoch_end_ns: int
    first_reading_ns: int | None
    last_reading_ns: int | None
    counter_mj: int
    attributed_mj: int
    prefill_mj: int
    decode_mj: int
    idle_mj: int
    samples: int
    gaps: int
    active_ns_total: int
    attributed_at_ns: int
    adjustment_mj: int


class SealRow(NamedTuple):
    request_id: str
    backend: str
    done_ns: int
    sealed_ns: int
    prefill_mj: int
    decode_mj: int
    idle_time_mj: int
    idle_tokens_mj: int


class UsageDeltaRow(NamedTuple):
    hour_start_ns: int
    tenant: str
    model_id: str
    backend: str
    requests: int
    prompt_tokens: int
    generated_tokens: int
    prefill_mj: int
    decode_mj: int
    active_ns: int


REQUEST_ENERGY_COLUMNS = RequestEnergyRow._fields
_REQUEST_ENERGY_TYPES = ["varchar", "int8", "varchar", "int8", "int8", "int8", "int8", "int8"]
BACKEND_EPOCH_COLUMNS = BackendEpochRow._fields
USAGE_KEY = UsageDeltaRow._fields[:4]
USAGE_VALUES = UsageDeltaRow._fields[4:]
REQUEST_COLUMNS = RequestRow._fields
SEAL_COLUMNS = SealRow._fields


def _q(conn: sa.Connection, sql: str) -> str:
    return sql.replace("?", "%s") if conn.dialect.name == "postgresql" else sql


def marks(n: int) -> str:
    return ", ".join("?" * n)


def fetch(conn: sa.Connection, sql: str, params: Sequence[Any] = ()) -> list[Row]:
    """All rows (SQLAlchemy ``Row`` objects: tuples in all but name, so no copy is made)."""
    return conn.exec_driver_sql(_q(conn, sql), tuple(params)).fetchall()  # type: ignore[return-value]


def fetch_as(conn: sa.Connection, make: Callable[[Iterable[Any]], T], sql: str, params: Sequence[Any] = ()) -> list[T]:
    """``fetch``, each row made into a named row (``make`` is a NamedTuple's ``_make``)."""
    return list(map(make, conn.exec_driver_sql(_q(conn, sql), tuple(params))))


def scalar(conn: sa.Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    return conn.exec_driver_sql(_q(conn, sql), tuple(params)).scalar()


# -- samples -------------------------------------------------------------------------------------------------------


def samples_between(conn: sa.Connection, devices: Sequence[str], lo_ns: int, hi_ns: int) -> list[SampleRow]:
    """The samples of ``devices`` with lo <= t <= hi, by time."""
    return fetch_as(
        conn,
        SampleRow._make,
        f"SELECT device, t_ns, energy_mj FROM samples WHERE device IN ({marks(len(devices))}) "
        "AND t_ns >= ? AND t_ns <= ? ORDER BY t_ns, device",
        (*devices, lo_ns, hi_ns),
    )


def first_sample_at_or_after(conn: sa.Connection, devices: Sequence[str], t_ns: int) -> int | None:
    return scalar(
        conn,
        f"SELECT MIN(t_ns) FROM samples WHERE device IN ({marks(len(devices))}) AND t_ns >= ?",
        (*devices, t_ns),
    )


def last_samples(conn: sa.Connection, devices: Sequence[str]) -> list[int | None]:
    """The last t_ns of each device, in one round trip (each an index lookup on the primary key)."""
    if not devices:
        return []
    cols = ", ".join("(SELECT MAX(t_ns) FROM samples WHERE device = ?)" for _ in devices)
    return list(conn.exec_driver_sql(_q(conn, f"SELECT {cols}"), tuple(devices)).one())


# -- requests ------------------------------------------------------------------------------------------------------


def epoch_requests(
    conn: sa.Connection, backend: str, lo_ns: int, end_ns: int, hi_ns: int, released_since_ns: int
) -> list[RequestRow]:
    """Finished request rows of ``backend`` that an epoch ending at ``end_ns`` whose readings'
    work time may span [lo, hi) needs: those whose [released, done] overlaps [lo, hi), and those that ended in it.

    ``released_since_ns`` bounds the scan: a request released earlier than that (longer than the open-request
    timeout) is only looked for in the epoch where it ended.
    """
    return fetch_as(
        conn,
        RequestRow._make,
        f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests WHERE backend = ? AND done_ns >= ? "
        "AND ((released_ns < ? AND released_ns >= ?) OR done_ns < ?)",
        (backend, lo_ns, hi_ns, released_since_ns, end_ns),
    )


def requests_of(
    conn: sa.Connection, backends: Sequence[str], lo_ns: int, end_ns: int, hi_ns: int, released_since_ns: int
) -> list[RequestRow]:
    """``epoch_requests`` for several backends and a run of epochs at once."""
    return fetch_as(
        conn,
        RequestRow._make,
        f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests WHERE backend IN ({marks(len(backends))}) "
        "AND done_ns >= ? AND ((released_ns < ? AND released_ns >= ?) OR done_ns < ?)",
        (*backends, lo_ns, hi_ns, released_since_ns, end_ns),
    )


def open_requests(conn: sa.Connection, backends: Sequence[str], cutoff_ns: int) -> list[OpenRequests]:
    """Per backend with open requests (done_ns NULL): the earliest release at or after ``cutoff_ns``, and how many
    were released before it. Aggregated in the database: there may be thousands in flight."""
    if not backends:
        return []
    return fetch_as(
        conn,
        OpenRequests._make,
        "SELECT backend, MIN(CASE WHEN released_ns >= ? THEN released_ns END), "
        "SUM(CASE WHEN released_ns < ? THEN 1 ELSE 0 END) FROM requests "
        f"WHERE backend IN ({marks(len(backends))}) AND done_ns IS NULL GROUP BY backend",
        (cutoff_ns, cutoff_ns, *backends),
    )


def ingested_since(
    conn: sa.Connection, lo_ns: int, backends: Sequence[str], released_before_ns: int | None, unrouted: bool
) -> list[IngestedRow]:
    """Rows written after ``lo_ns`` that may need the engine: finished rows of ``backends``
    released before ``released_before_ns`` (late for an attributed epoch, maybe), and rows that never reached a
    backend (``unrouted``)."""
    conds = []
    params: list[Any] = [lo_ns]
    if unrouted:
        conds.append("backend IS NULL")
    if backends and released_before_ns is not None:
        conds.append(f"(backend IN ({marks(len(backends))}) AND released_ns < ? AND done_ns IS NOT NULL)")
        params += [*backends, released_before_ns]
    if not conds:
        return []
    return fetch_as(
        conn,
        IngestedRow._make,
        f"SELECT {', '.join(IngestedRow._fields)} FROM requests WHERE ingested_ns > ? AND ({' OR '.join(conds)})",
        params,
    )


# -- epochs --------------------------------------------------------------------------------------------------------


def last_epoch(conn: sa.Connection, backend: str) -> EpochMark | None:
    """The backend's newest epoch."""
    rows = fetch_as(
        conn,
        EpochMark._make,
        "SELECT epoch_start_ns, epoch_end_ns, last_reading_ns, attributed_at_ns FROM backend_epochs "
        "WHERE backend = ? ORDER BY epoch_start_ns DESC LIMIT 1",
        (backend,),
    )
    return rows[0] if rows else None


def epochs_in(conn: sa.Connection, backend: str, start_lo_ns: int, start_hi_ns: int) -> list[EpochMark]:
    """The backend's epochs with start in [lo, hi], by start."""
    return fetch_as(
        conn,
        EpochMark._make,
        "SELECT epoch_start_ns, epoch_end_ns, last_reading_ns, attributed_at_ns FROM backend_epochs "
        "WHERE backend = ? AND epoch_start_ns >= ? AND epoch_start_ns <= ? ORDER BY epoch_start_ns",
        (backend, start_lo_ns, start_hi_ns),
    )


def epoch_attributed_at(conn: sa.Connection, backend: str, epoch_start_ns: int) -> int | None:
    return scalar(
        conn,
        "SELECT attributed_at_ns FROM backend_epochs WHERE backend = ? AND epoch_start_ns = ?",
        (backend, epoch_start_ns),
    )


def old_epoch_contribution(conn: sa.Connection, backend: str, epoch_start_ns: int) -> list[UsageContribution]:
    """What an epoch's current request_energy rows add to usage, per row, joined to its request."""
    return fetch_as(
        conn,
        UsageContribution._make,
        "SELECT r.received_ns, r.tenant, r.model_id, r.done_ns, r.prompt_tokens, r.generated_tokens, "
        "e.prefill_mj, e.decode_mj, e.active_ns FROM request_energy e JOIN requests r ON r.request_id = e.request_id "
        "WHERE e.backend = ? AND e.epoch_start_ns = ?",
        (backend, epoch_start_ns),
    )


def delete_epoch(conn: sa.Connection, backend: str, epoch_start_ns: int) -> None:
    params = (backend, epoch_start_ns)
    conn.exec_driver_sql(_q(conn, "DELETE FROM request_energy WHERE backend = ? AND epoch_start_ns = ?"), params)
    conn.exec_driver_sql(_q(conn, "DELETE FROM backend_epochs WHERE backend = ? AND epoch_start_ns = ?"), params)


def insert_backend_epoch(conn: sa.Connection, row: BackendEpochRow) -> None:
    insert_backend_epochs(conn, [row])


def insert_backend_epochs(conn: sa.Connection, rows: Sequence[BackendEpochRow]) -> None:
    if not rows:
        return
    cols = BACKEND_EPOCH_COLUMNS
    sql = _q(conn, f"INSERT INTO backend_epochs ({', '.join(cols)}) VALUES ({marks(len(cols))})")
    if len(rows) == 1:
        conn.exec_driver_sql(sql, rows[0])
    else:
        conn.exec_driver_sql(sql, list(rows))


def conflicting_request_energy(conn: sa.Connection, epoch_start_ns: int, backend: str, ids: Sequence[str]) -> set[str]:
    """Request ids that already hold a request_energy row at this epoch start under another backend."""
    out: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        out.update(
            r[0]
            for r in fetch(
                conn,
                f"SELECT request_id FROM request_energy WHERE epoch_start_ns = ? AND backend <> ? "
                f"AND request_id IN ({marks(len(chunk))})",
                (epoch_start_ns, backend, *chunk),
            )
        )
    return out


def unrouted_markers(conn: sa.Connection, epoch_lo_ns: int, epoch_hi_ns: int) -> set[str]:
    return {
        r[0]
        for r in fetch(
            conn,
            "SELECT request_id FROM request_energy WHERE backend = '' AND epoch_start_ns >= ? AND epoch_start_ns <= ?",
            (epoch_lo_ns, epoch_hi_ns),
        )
    }


def insert_request_energy(conn: sa.Connection, rows: Sequence[RequestEnergyRow]) -> None:
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        _copy(conn, "request_energy", REQUEST_ENERGY_COLUMNS, _REQUEST_ENERGY_TYPES, rows)
        return
    cols = REQUEST_ENERGY_COLUMNS
    conn.exec_driver_sql(f"INSERT INTO request_energy ({', '.join(cols)}) VALUES ({marks(len(cols))})", list(rows))


# -- seals ---------------------------------------------------------------------------------------------------------


def pinned_rows(conn: sa.Connection, backend: str, epoch_start_ns: int) -> list[PinnedRow]:
    """The epoch's request_energy rows of sealed requests, with what usage needs of their request."""
    return fetch_as(
        conn,
        PinnedRow._make,
        "SELECT e.request_id, e.prefill_mj, e.decode_mj, e.active_ns, e.idle_time_mj, e.idle_tokens_mj, "
        "r.received_ns, r.tenant, r.model_id, r.done_ns, r.prompt_tokens, r.generated_tokens "
        "FROM request_energy e JOIN request_seals s ON s.request_id = e.request_id "
        "JOIN requests r ON r.request_id = e.request_id WHERE e.backend = ? AND e.epoch_start_ns = ?",
        (backend, epoch_start_ns),
    )


def sealed_among(conn: sa.Connection, ids: Sequence[str]) -> set[str]:
    """Which of ``ids`` are sealed."""
    out: set[str] = set()
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        q = f"SELECT request_id FROM request_seals WHERE request_id IN ({marks(len(chunk))})"
        out.update(r[0] for r in fetch(conn, q, chunk))
    return out


def last_sealed_done(conn: sa.Connection, backend: str) -> int | None:
    """The latest ``done_ns`` of the backend's sealed requests (an index lookup)."""
    return scalar(conn, "SELECT MAX(done_ns) FROM request_seals WHERE backend = ?", (backend,))


def writer_marks(conn: sa.Connection) -> list[WriterMark]:
    """Every ledger's how-far mark (one row per journal: a handful)."""
    return fetch_as(
        conn, WriterMark._make, "SELECT writer_id, name, through_ns, clock_offset_ns FROM ledger_writers", ()
    )


def forget_writers(conn: sa.Connection, writer_ids: Sequence[str], silent_before_ns: int) -> None:
    """Delete these writers' marks, unless one marked again at or after ``silent_before_ns`` meanwhile."""
    conn.execute(
        sa.text("DELETE FROM ledger_writers WHERE writer_id IN :ids AND through_ns < :before").bindparams(
            sa.bindparam("ids", expanding=True)
        ),
        {"ids": list(writer_ids), "before": silent_before_ns},
    )


def seal_candidates(
    conn: sa.Connection, backend: str, after: tuple[int, str], done_before_ns: int, limit: int
) -> list[SealCandidate]:
    """Finished, unsealed requests of ``backend`` with (done_ns, request_id) after ``after`` and done_ns before
    ``done_before_ns``, in that order."""
    done_after, id_after = after
    return fetch_as(
        conn,
        SealCandidate._make,
        "SELECT r.request_id, r.released_ns, r.done_ns, r.ingested_ns FROM requests r "
        "LEFT JOIN request_seals s ON s.request_id = r.request_id "
        "WHERE r.backend = ? AND r.done_ns >= ? AND r.done_ns < ? AND (r.done_ns > ? OR r.request_id > ?) "
        "AND s.request_id IS NULL ORDER BY r.done_ns, r.request_id LIMIT ?",
        (backend, done_after, done_before_ns, done_after, id_after, limit),
    )


def unsealed_by_id(conn: sa.Connection, backend: str, ids: Sequence[str]) -> list[SealCandidate]:
    """Those of ``ids`` that are finished requests of ``backend`` and not sealed."""
    out: list[SealCandidate] = []
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        out += fetch_as(
            conn,
            SealCandidate._make,
            "SELECT r.request_id, r.released_ns, r.done_ns, r.ingested_ns FROM requests r "
            "LEFT JOIN request_seals s ON s.request_id = r.request_id "
            f"WHERE r.request_id IN ({marks(len(chunk))}) AND r.backend = ? AND r.done_ns IS NOT NULL "
            "AND s.request_id IS NULL",
            (*chunk, backend),
        )
    return out


def energy_sums(conn: sa.Connection, ids: Sequence[str]) -> dict[str, tuple[int, int, int, int]]:
    """Per request: the sums of its request_energy rows (prefill_mj, decode_mj, idle_time_mj, idle_tokens_mj)."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for i in range(0, len(ids), 500):
        chunk = ids[i : i + 500]
        for rid, pre, dec, it, itok in fetch(
            conn,
            "SELECT request_id, SUM(prefill_mj), SUM(decode_mj), SUM(idle_time_mj), SUM(idle_tokens_mj) "
            f"FROM request_energy WHERE request_id IN ({marks(len(chunk))}) GROUP BY request_id",
            chunk,
        ):
            out[rid] = (int(pre), int(dec), int(it), int(itok))
    return out


def insert_seals(conn: sa.Connection, rows: Sequence[SealRow]) -> None:
    """Insert seals (SEAL_COLUMNS order); one that exists already (another meter sealed it) is left as it is."""
    if not rows:
        return
    cols = SEAL_COLUMNS
    conn.exec_driver_sql(
        _q(
            conn,
            f"INSERT INTO request_seals ({', '.join(cols)}) VALUES ({marks(len(cols))}) "
            "ON CONFLICT (request_id) DO NOTHING",
        ),
        list(rows),
    )


def seal_requests(conn: sa.Connection, seals: Sequence[tuple[str, str, int]], sealed_ns: int) -> None:
    """Seal ``seals`` ((request_id, backend, done_ns), ids distinct): each one's figures are the sums of its
    request_energy rows (0 without rows), read inside the caller's transaction; an existing seal stays as it is.
    PostgreSQL: one ``INSERT ... SELECT`` over arrays (sums and insert in the server, one round trip). SQLite: the
    sums are read in chunks and inserted with executemany."""
    if not seals:
        return
    if conn.dialect.name != "postgresql":
        ids = [s[0] for s in seals]
        sums = energy_sums(conn, ids)
        insert_seals(
            conn, [SealRow(rid, backend, done, sealed_ns, *sums.get(rid, (0, 0, 0, 0))) for rid, backend, done in seals]
        )
        return
    ids, backends, dones = (list(c) for c in zip(*seals, strict=True))
    # The planner over-estimates the rows per id before the table is analysed and would JIT-compile this
    # (100+ ms for a statement that runs in tens of ms): off for this transaction only.
    conn.exec_driver_sql("SET LOCAL jit = off")
    conn.exec_driver_sql(
        f"INSERT INTO request_seals ({', '.join(SEAL_COLUMNS)}) "
        "SELECT c.request_id, c.backend, c.done_ns, %s, s.* "
        "FROM unnest(%s::varchar[], %s::varchar[], %s::bigint[]) AS c(request_id, backend, done_ns) "
        "CROSS JOIN LATERAL (SELECT COALESCE(SUM(e.prefill_mj), 0), COALESCE(SUM(e.decode_mj), 0), "
        "COALESCE(SUM(e.idle_time_mj), 0), COALESCE(SUM(e.idle_tokens_mj), 0) FROM request_energy e "
        "WHERE e.request_id = c.request_id) AS s "  # a lookup per id: never a scan of the whole table
        "ON CONFLICT (request_id) DO NOTHING",
        (sealed_ns, ids, backends, dones),
    )


def add_usage(conn: sa.Connection, deltas: Sequence[UsageDeltaRow]) -> None:
    """Add deltas to usage_hourly (insert or add)."""
    if not deltas:
        return
    cols = (*USAGE_KEY, *USAGE_VALUES)
    sets = ", ".join(f"{c} = usage_hourly.{c} + excluded.{c}" for c in USAGE_VALUES)
    sql = (
        f"INSERT INTO usage_hourly ({', '.join(cols)}) VALUES ({marks(len(cols))}) "
        f"ON CONFLICT ({', '.join(USAGE_KEY)}) DO UPDATE SET {sets}"
    )
    conn.exec_driver_sql(_q(conn, sql), list(deltas))


def _copy(
    conn: sa.Connection, table: str, cols: Sequence[str], types: list[str], rows: Sequence[tuple[Any, ...]]
) -> None:
    dbapi_conn = conn.connection.dbapi_connection
    assert dbapi_conn is not None
    cursor = dbapi_conn.cursor()
    statement = f"COPY {table} ({', '.join(cols)}) FROM STDIN (FORMAT BINARY)"
    try:
        with cursor.copy(statement) as copy:
            copy.set_types(types)
            write_row = copy.write_row
            for r in rows:
                write_row(r)
    except conn.dialect.loaded_dbapi.Error as err:
        dialect = conn.dialect
        disconnect = dialect.is_disconnect(err, dbapi_conn, cursor)
        if disconnect:
            conn.invalidate(err)
        wrapped = sa.exc.DBAPIError.instance(
            statement, None, err, dialect.loaded_dbapi.Error, connection_invalidated=disconnect, dialect=dialect
        )
        raise wrapped from err
    finally:
        cursor.close()


# -- transactions --------------------------------------------------------------------------------------------------


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for pg_advisory_xact_lock."""
    return int.from_bytes(
        hashlib.blake2b(f"joulegate-engine:{name}".encode(), digest_size=8).digest(), "big", signed=True
    )


@contextlib.contextmanager
def locked_transaction(engine: sa.Engine, names: str | Sequence[str]) -> Iterator[sa.Connection]:
    """One transaction holding the engine's lock for each of ``names`` (backends), taken in one fixed order so that
    two meters never deadlock; commits on success, rolls back on error."""
    keys = sorted({lock_key(n) for n in ([names] if isinstance(names, str) else names)})
    with engine.connect() as conn:
        if conn.dialect.name == "sqlite":
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            saved = dbapi.isolation_level
            dbapi.isolation_level = None  # we issue BEGIN ourselves
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(Exception):  # SQLite may have rolled back on its own already
                        conn.exec_driver_sql("ROLLBACK")
                    raise
                conn.exec_driver_sql("COMMIT")
                conn.commit()  # clears SQLAlchemy's own transaction state; nothing left to commit in SQLite
            finally:
                dbapi.isolation_level = saved
        else:
            with conn.begin():
                if len(keys) == 1:
                    conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (keys[0],))
                else:
                    conn.exec_driver_sql(
                        "SELECT pg_advisory_xact_lock(k) FROM (SELECT unnest(%s::bigint[]) AS k ORDER BY k) AS keys",
                        (keys,),
                    )
                yield conn


# -- calibration ---------------------------------------------------------------------------------------------------

_CALIBRATION = tuple(f.name for f in dataclasses.fields(PowerModel))  # backend_calibrations' columns besides the keys


def devices_key(devices: Iterable[str]) -> str:
    """``backend_calibrations.devices`` of a set of devices: their names sorted, as a JSON array (unambiguous
    whatever a name holds)."""
    return json.dumps(sorted(devices), separators=(",", ":"))


def stored_calibration(conn: sa.Connection, backend: str, devices: Iterable[str]) -> PowerModel | None:
    """The backend's latest fit a meter stored (``backend_calibrations``), if it was made on these ``devices``:
    None if none was, or the backend ran on other devices then (their power says nothing about these)."""
    rows = fetch(
        conn,
        f"SELECT {', '.join(_CALIBRATION)} FROM backend_calibrations WHERE backend = ? AND devices = ?",
        (backend, devices_key(devices)),
    )
    return PowerModel(*rows[0]) if rows else None


def store_calibration(
    conn: sa.Connection, backend: str, devices: Iterable[str], model: PowerModel, fitted_ns: int
) -> None:
    """Write (or overwrite) the backend's stored fit, made on ``devices``."""
    cols = ("backend", "devices", *_CALIBRATION, "fitted_ns")
    sets = ", ".join(f"{c} = excluded.{c}" for c in cols[1:])
    values = (backend, devices_key(devices), *dataclasses.astuple(model), fitted_ns)
    sql = (
        f"INSERT INTO backend_calibrations ({', '.join(cols)}) VALUES ({marks(len(cols))}) "
        f"ON CONFLICT (backend) DO UPDATE SET {sets}"
    )
    conn.exec_driver_sql(_q(conn, sql), values)
