"""The ledger: takes request timelines and counter samples off the hot path and writes them to SQL in batches.

Hot path. ``request_started``, ``request_finished`` and ``add_samples`` append to a ``collections.deque`` (atomic
and thread-safe in CPython, no lock) and return: O(1), no I/O, no waiting, no exception for a healthy interpreter.
The writer thread is woken early only when a full batch is waiting; otherwise it drains every
``flush_interval_s``.

Writer. One thread drains the buffer in batches of at most ``batch_size`` rows and writes each batch in ONE
transaction with bulk dialect upserts (``meter.store.bulk``: executemany on SQLite, COPY + INSERT ... SELECT on
PostgreSQL), idempotent on the primary keys:

- ``RequestStart``: INSERT the request as open, ON CONFLICT DO NOTHING (it never regresses a finished row);
- ``Timeline``: INSERT the full row, ON CONFLICT DO UPDATE ... WHERE some column differs, so an identical replay
  changes nothing, not even ``ingested_ns``;
- ``Sample``: INSERT, ON CONFLICT DO NOTHING.

Within a batch, duplicates are folded first (the last timeline of a request wins, like it would in sequence).

Outages. When a write fails because the database is unreachable (refused or dropped connections, timeouts, any
``OperationalError``), or does not return within ``write_timeout_s`` (a hung server or network: database calls
run on a thread of their own so the writer can stop waiting), the batch goes to the journal (``meter.journal``:
JSON lines, fsync'd per batch) and the ledger switches to *journaling*: every later batch is appended behind it,
so order is kept, while the writer retries the database with exponential backoff (tenacity; its sleeps are spent
journaling new arrivals). Once the database answers, the journal is replayed in order, in batches, and truncated.
A journal left by a crashed process is replayed at the next ``start``. Replays are idempotent, so a replay
interrupted by another failure (or a crash between commit and truncate) is simply repeated: nothing is lost,
nothing is doubled.

A row the database rejects for good (a ``DataError`` or ``IntegrityError``, not an outage) would block its batch
forever; the writer then writes that batch row by row and appends the rejected rows to ``<journal>.rejected``
(also JSON lines) with an error log, so one bad row never holds up the others.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import structlog
import tenacity

from meter.journal import Journal
from meter.samples import Sample
from meter.store.bulk import SAMPLE_COLUMNS, START_COLUMNS, TIMELINE_COLUMNS, BulkWriter
from meter.store.db import make_engine
from meter.timeline import Api, RequestStart, Timeline

log = structlog.get_logger(__name__)

Record = dict[str, Any]  # one journal line
Row = tuple[Any, ...]  # one database row, in meter.store.bulk's column order

# Record kinds, as stored in the journal under "k".
START, TIMELINE, SAMPLE = "s", "t", "m"
_COLUMNS = {START: START_COLUMNS, TIMELINE: TIMELINE_COLUMNS, SAMPLE: SAMPLE_COLUMNS}
# Values for columns a journal record written by an older version does not have.
_MISSING = {"prompt_tokens_estimated": False}

# SQLSTATEs that mean "not now" rather than "never": connection exceptions, insufficient resources, operator
# intervention (admin shutdown, cannot connect now), transaction rollback (serialization failure, deadlock), and
# an undefined table/column (the schema is not migrated yet).
_TRANSIENT_SQLSTATE_CLASSES = ("08", "53", "57", "40")
_TRANSIENT_SQLSTATES = ("42P01", "42703")


class DatabaseStalledError(TimeoutError):
    """A write did not return within ``write_timeout_s`` (a hung server, proxy or network): treated as an outage."""


@dataclass(frozen=True, slots=True)
class LedgerStats:
    buffered: int  # items handed in and not yet taken by the writer
    written_requests: int  # start and timeline rows committed to SQL (directly or by replay)
    written_samples: int  # sample rows committed to SQL (directly or by replay)
    journaled: int  # records appended to the journal
    replayed: int  # journal records replayed into SQL
    rejected: int  # records the database refused for good (kept in <journal>.rejected)
    db_available: bool  # whether the last database write succeeded
    last_error: str | None  # the last database error, if any
    journal_pending: bool  # the journal holds records not yet in SQL


class _FlushMarker:
    """Put in the buffer by ``flush``: set once every item before it is durable."""

    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` means the database is unreachable or not ready (retry later) rather than a bad row."""
    if isinstance(exc, sa.exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError):
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return bool(sqlstate) and (sqlstate in _TRANSIENT_SQLSTATES or sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES)
    return isinstance(exc, sa.exc.DisconnectionError | sa.exc.TimeoutError | OSError)


def _is_permanent(exc: BaseException) -> bool:
    """A database error that retrying cannot fix (the row is bad). Anything else is treated as an outage."""
    return isinstance(exc, sa.exc.DBAPIError) and not is_transient(exc)


def start_row(s: RequestStart) -> Row:
    return (s.request_id, s.tenant, s.model_id, s.backend, s.received_ns, s.released_ns)


def timeline_row(t: Timeline) -> Row:
    return (
        t.request_id,
        t.tenant,
        t.model_id,
        t.backend,
        t.traffic_class,
        t.api.value if isinstance(t.api, Api) else str(t.api),
        t.status,
        t.correlation_id,
        t.received_ns,
        t.released_ns,
        t.first_token_ns,
        t.done_ns,
        t.prompt_tokens,
        t.prompt_tokens_estimated,
        t.generated_tokens,
    )


@dataclass(slots=True)
class _Batch:
    """One batch folded to one row per key, in the order the upserts run: starts, timelines, samples.

    Folding keeps what applying the items one by one would leave: the last timeline of a request, the first start
    (DO NOTHING), the first reading per (device, t_ns); a start whose request the batch also finishes is dropped,
    since the timeline overwrites it anyway.
    """

    starts: dict[str, Row]
    timelines: dict[str, Row]
    samples: dict[tuple[str, int], Row]

    @classmethod
    def empty(cls) -> _Batch:
        return cls({}, {}, {})

    def add_start(self, row: Row) -> None:
        if row[0] not in self.timelines:
            self.starts.setdefault(row[0], row)

    def add_timeline(self, row: Row) -> None:
        self.starts.pop(row[0], None)
        self.timelines[row[0]] = row

    def add_sample(self, row: Row) -> None:
        self.samples.setdefault((row[0], row[1]), row)

    @classmethod
    def from_items(cls, items: Sequence[object]) -> _Batch:
        """From hot-path objects, in the order they were handed in."""
        b = cls.empty()
        for item in items:
            if type(item) is Timeline:
                b.add_timeline(timeline_row(item))
            elif type(item) is list:
                for s in item:
                    b.add_sample((s.device, s.t_ns, s.energy_mj, s.error))
            elif type(item) is RequestStart:
                b.add_start(start_row(item))
            else:
                log.error("ledger: ignoring an object of unknown type", type=type(item).__name__)
        return b

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> _Batch:
        """From journal records; a record written by an older or newer version still maps by column name."""
        b = cls.empty()
        adders = {START: b.add_start, TIMELINE: b.add_timeline, SAMPLE: b.add_sample}
        for r in records:
            kind = r.get("k")
            if kind not in adders:
                log.warning("ledger: skipping a journal record of unknown kind", kind=kind)
                continue
            adders[kind](tuple(r.get(c, _MISSING.get(c)) for c in _COLUMNS[kind]))
        return b

    def to_records(self) -> list[Record]:
        out: list[Record] = []
        for kind, rows in ((START, self.starts), (TIMELINE, self.timelines), (SAMPLE, self.samples)):
            cols = _COLUMNS[kind]
            out.extend({"k": kind, **dict(zip(cols, row, strict=True))} for row in rows.values())
        return out

    @property
    def requests(self) -> int:
        return len(self.starts) + len(self.timelines)

    def __len__(self) -> int:
        return len(self.starts) + len(self.timelines) + len(self.samples)


class Ledger:
    """Durable, non-blocking, batched writer of request rows and samples. See the module docstring."""

    def __init__(
        self,
        url_or_engine: str | sa.Engine,
        journal_path: str | Path,
        *,
        flush_interval_s: float = 0.2,
        batch_size: int = 5000,
        retry_initial_s: float = 0.2,
        retry_max_s: float = 5.0,
        write_timeout_s: float = 30.0,
        engine_kw: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(url_or_engine, sa.Engine):
            self._engine, self._owns_engine = url_or_engine, False
        else:
            self._engine, self._owns_engine = make_engine(url_or_engine, **(engine_kw or {})), True
        self._bulk = BulkWriter.for_dialect(self._engine.dialect)
        self._journal = Journal(journal_path)
        self._rejected = Journal(Path(str(journal_path) + ".rejected"))
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._write_timeout_s = write_timeout_s
        # Database calls run on their own thread so that a hung connection (no error, just silence) costs the
        # writer at most write_timeout_s: it then journals and keeps journaling, as for any outage.
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-ledger-db")
        self._inflight: Future[None] | None = None

        self._buf: deque[object] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._late_warned = False

        self._written_requests = 0
        self._written_samples = 0
        self._journaled = 0
        self._replayed = 0
        self._rejected_n = 0
        self._db_available = True
        self._last_error: str | None = None
        self._pending = False  # the journal holds records that are not in SQL yet

    # -- hot path (any thread; O(1); never blocks) -----------------------------------------------------------------

    def request_started(self, start: RequestStart) -> None:
        self._put(start)

    def request_finished(self, timeline: Timeline) -> None:
        self._put(timeline)

    def add_samples(self, samples: Sequence[Sample]) -> None:
        if samples:
            self._put(list(samples))

    def _put(self, item: object) -> None:
        buf = self._buf
        buf.append(item)
        if len(buf) >= self._batch_size:
            self._wake.set()
        if self._closed and not self._late_warned:
            self._late_warned = True
            log.warning("ledger: records handed in after close are not written")

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    def start(self) -> None:
        """Open (and lock) the journal and start the writer thread, which first replays a leftover journal."""
        if self._thread is not None:
            return
        self._journal.open()
        self._pending = not self._journal.is_empty()
        if self._pending:
            log.info("ledger: found a journal from an earlier run; replaying it", path=str(self._journal.path))
        self._thread = threading.Thread(target=self._run, name="joulegate-ledger", daemon=True)
        self._thread.start()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything handed in before this call is durable (in SQL or in the journal).

        Blocks up to ``timeout_s``; returns False if that was not enough (e.g. the database hangs and
        ``write_timeout_s`` is longer). From a coroutine, call it through ``asyncio.to_thread``.
        """
        thread = self._thread
        if thread is None or not thread.is_alive():
            return not self._buf
        marker = _FlushMarker()
        self._buf.append(marker)
        self._wake.set()
        return marker.done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush, stop the writer and close the journal. Rows the database did not take stay in the journal."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        if not self.flush(timeout_s):
            log.warning("ledger: close could not make every record durable in time", buffered=len(self._buf))
        self._closed = True
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("ledger: the writer thread is still busy; leaving the journal open")
                return
        stuck = self._inflight is not None and not self._inflight.done()
        self._db.shutdown(wait=not stuck, cancel_futures=True)
        self._journal.close()
        self._rejected.close()
        if self._owns_engine:
            self._engine.dispose()

    def __enter__(self) -> Ledger:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def stats(self) -> LedgerStats:
        return LedgerStats(
            buffered=len(self._buf),
            written_requests=self._written_requests,
            written_samples=self._written_samples,
            journaled=self._journaled,
            replayed=self._replayed,
            rejected=self._rejected_n,
            db_available=self._db_available,
            last_error=self._last_error,
            journal_pending=self._pending,
        )

    # -- writer thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._pending:
                self._recover(first_wait_s=0.0)
            while True:
                items, markers = self._take()
                if items:
                    self._persist(_Batch.from_items(items), markers)
                else:
                    _release(markers)
                if items or markers:
                    continue
                if self._stopping.is_set():
                    return
                self._wake.wait(self._flush_interval_s)
                self._wake.clear()
        except BaseException:  # a bug: say so loudly; the hot path keeps buffering in memory
            log.exception("ledger: writer thread died")
            raise

    def _take(self) -> tuple[list[object], list[_FlushMarker]]:
        """Up to ``batch_size`` rows from the buffer; a flush marker ends the batch."""
        items: list[object] = []
        markers: list[_FlushMarker] = []
        rows = 0
        buf = self._buf
        while rows < self._batch_size:
            try:
                item = buf.popleft()
            except IndexError:
                break
            if type(item) is _FlushMarker:
                markers.append(item)
                break
            items.append(item)
            rows += len(item) if type(item) is list else 1
        return items, markers

    def _persist(self, batch: _Batch, markers: list[_FlushMarker]) -> None:
        """Write one batch to SQL, or, when the database is away (or the journal is not replayed yet), journal it.

        ``markers`` (flushes waiting on this batch) are released as soon as the batch is durable either way, before
        any retrying starts.
        """
        if not self._pending:
            try:
                self._write(batch)
            except Exception as exc:
                self._note_failure(exc)
            else:
                _release(markers)
                return
        self._journal_append(batch)
        _release(markers)
        self._recover(first_wait_s=self._retry_initial_s)

    def _journal_append(self, batch: _Batch) -> None:
        """Append to the journal; if even that fails (disk full), keep retrying: the records are only here."""
        records = batch.to_records()
        while True:
            try:
                self._journaled += self._journal.append(records)
                self._pending = True
                return
            except OSError as exc:
                log.error("ledger: cannot write the journal; retrying", path=str(self._journal.path), error=str(exc))
                time.sleep(1.0)

    def _note_failure(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if self._db_available:
            log.warning("ledger: database unavailable; journaling", error=self._last_error)
        if not is_transient(exc):
            log.exception("ledger: unexpected error writing to the database; journaling", exc_info=exc)
        self._db_available = False

    def _recover(self, first_wait_s: float) -> None:
        """Replay the journal into SQL, retrying with backoff; every wait is spent journaling new arrivals."""
        if first_wait_s > 0:
            self._sleep_journaling(first_wait_s)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=tenacity.wait_exponential(multiplier=self._retry_initial_s, max=self._retry_max_s)
            + tenacity.wait_random(0, self._retry_initial_s),
            stop=lambda _state: self._stopping.is_set(),
            sleep=self._sleep_journaling,
            before_sleep=self._before_retry,
            reraise=True,
        )
        try:
            retrying(self._replay_journal)
        except Exception as exc:  # only when stopping: the journal keeps the records for the next start
            self._note_failure(exc)
            log.warning("ledger: stopping with records in the journal", path=str(self._journal.path))

    def _before_retry(self, state: tenacity.RetryCallState) -> None:
        if state.outcome is not None and (exc := state.outcome.exception()) is not None:
            self._note_failure(exc)
        log.info(
            "ledger: database still unavailable",
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 3),
            journaled=self._journaled,
        )

    def _sleep_journaling(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            while True:  # journal whatever arrived, batch by batch, and release flushes waiting on it
                items, markers = self._take()
                if items:
                    self._journal_append(_Batch.from_items(items))
                _release(markers)
                if not items and not markers:
                    break
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return
            self._wake.wait(min(remaining, self._flush_interval_s))
            self._wake.clear()

    def _replay_journal(self) -> None:
        replayed = 0
        t0 = time.monotonic()
        for chunk in self._journal.read_chunks(self._batch_size):
            self._write(_Batch.from_records(chunk))
            replayed += len(chunk)
        self._journal.truncate()
        self._pending = False
        self._replayed += replayed
        if not self._db_available or replayed:
            log.info(
                "ledger: database available; journal replayed", records=replayed, s=round(time.monotonic() - t0, 3)
            )
        self._db_available = True

    # -- SQL -------------------------------------------------------------------------------------------------------

    def _write(self, batch: _Batch) -> None:
        """Write a batch in one transaction. Raises on an outage; diverts rows the database refuses for good."""
        try:
            self._execute(batch)
        except Exception as exc:
            if not _is_permanent(exc):
                raise
            log.error("ledger: the database refused a batch; writing it row by row", error=str(exc).splitlines()[0])
            self._write_row_by_row(batch)
            return
        self._db_available = True
        self._written_requests += batch.requests
        self._written_samples += len(batch.samples)

    def _execute(self, batch: _Batch) -> None:
        """Run the batch's transaction on the database thread, waiting at most ``write_timeout_s``.

        A write that times out may still commit later; its batch is journaled meanwhile and replayed afterwards,
        which the idempotent upserts make harmless. No new write starts while a stuck one is in flight, so writes
        never overtake each other.
        """
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            raise DatabaseStalledError("an earlier write to the database has not returned yet")
        self._inflight = future = self._db.submit(self._execute_now, batch)
        try:
            future.result(timeout=self._write_timeout_s)
        except TimeoutError:
            if future.done():  # the write itself raised a TimeoutError (e.g. the pool's)
                raise
            raise DatabaseStalledError(f"a write to the database took longer than {self._write_timeout_s} s") from None

    def _execute_now(self, batch: _Batch) -> None:
        with self._engine.begin() as conn:
            self._bulk.write(
                conn,
                list(batch.starts.values()),
                list(batch.timelines.values()),
                list(batch.samples.values()),
                time.time_ns(),
            )

    def _write_row_by_row(self, batch: _Batch) -> None:
        """Each row in its own transaction; an outage raises (the caller journals the whole batch: idempotent)."""
        for single in _singles(batch):
            try:
                self._execute(single)
            except Exception as exc:
                if not _is_permanent(exc):
                    raise
                self._reject(single, exc)
                continue
            self._written_requests += single.requests
            self._written_samples += len(single.samples)

    def _reject(self, single: _Batch, exc: BaseException) -> None:
        reason = str(exc).splitlines()[0][:500]
        records = [{**r, "rejected_because": reason} for r in single.to_records()]
        log.error("ledger: the database refused a record; kept in the rejected file", error=reason, record=records)
        self._rejected.open()
        self._rejected.append(records)
        self._rejected_n += len(records)


def _release(markers: list[_FlushMarker]) -> None:
    for m in markers:
        m.done.set()


def _singles(batch: _Batch) -> list[_Batch]:
    out = [_Batch({k: r}, {}, {}) for k, r in batch.starts.items()]
    out += [_Batch({}, {k: r}, {}) for k, r in batch.timelines.items()]
    out += [_Batch({}, {}, {k: r}) for k, r in batch.samples.items()]
    return out
