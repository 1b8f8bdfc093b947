"""The ledger: takes request timelines and counter samples off the hot path and writes them to SQL in batches.

Hot path. ``request_started``, ``request_finished`` and ``add_samples`` turn the record into its row (checked and
made storable, see *The door*), append its line to the write-ahead journal (``meter.journal``: one plain
``write()``, no fsync) and put the row in a ``collections.deque``, both under one lock so that the journal's order
is the buffer's order. Then they return: a few microseconds, no waiting on the database, no exception. Once a
hand-off has returned, its record survives a kill of the process (the journal is in the kernel's page cache).

The door. Every value of a row must be ``None``, an ``int`` that fits 64 bits, or a ``str``. A string that no
database can store (a lone surrogate, which is how aiohttp hands on a non-UTF-8 header byte; a NUL, which PostgreSQL
text cannot hold) is escaped (``\\xff``, ``\\x00``), so the request still has its row. Anything else is refused at
the door: quarantined (``<journal>.rejected``), counted and logged, never handed to the database.

Writer. One thread drains the buffer in batches of at most ``batch_size`` rows and writes each batch in ONE
transaction with bulk dialect upserts (``meter.store.bulk``: executemany on SQLite, COPY + INSERT ... SELECT on
PostgreSQL), idempotent on the primary keys:

- ``RequestStart``: INSERT the request as open, ON CONFLICT DO NOTHING (it never regresses a finished row);
- ``Timeline``: INSERT the full row, ON CONFLICT DO UPDATE ... WHERE some column differs, so an identical replay
  changes nothing, not even ``ingested_ns``;
- ``Sample``: INSERT, ON CONFLICT DO NOTHING.

Within a batch, duplicates are folded first (the last timeline of a request wins, like it would in sequence).
Every few seconds (``rotate_s``) the writer seals the journal's segment; once every record handed in before the
seal is in SQL, it writes the requests still open into the new segment (a *checkpoint*, so the journal always knows
every request in flight) and deletes the sealed segments. A heartbeat line each ``heartbeat_s`` records that the
process was alive.

How far. With each heartbeat the writer also tells the database how far it has written: a mark taken under the
hand-off lock goes through the buffer, and once every record before it is in SQL (and nothing waits in the journal)
``ledger_writers.through_ns`` takes its time, less ``MARK_SLACK_NS`` (1 s) for the statements between a request's
release and its hand-in. A meter seals no request whose epochs end past the lowest mark of the
writers it has heard from lately, so a replica cut off from the database cannot have its energy sealed into the
others' bills while its timelines wait in its journal. The mark carries the process's clock offset against the
database server's (``meter.store.clock``), so the meter sees a host whose clock disagrees with its own. The row goes
under the journal's id (``Journal.writer_id``), so a process that takes a dead one's journal over goes on with its
row; a clean stop deletes it.

Poison. A batch the database refuses for a reason other than an outage (``meter.store.db.is_outage``: a data or
integrity error, a value the driver cannot bind) is split in halves until the refused records are alone; those are
quarantined, counted and logged, and every other record lands. A record can therefore never stop the writer, and a
journal line that does not decode is quarantined the same way: nothing can wedge the replay.

Outages. When a write fails because the database is unreachable (refused or dropped connections, timeouts,
``is_outage``), or does not return within ``write_timeout_s`` (a hung server or network: database calls run on a
thread of their own so the writer can stop waiting), the ledger switches to *journaling*: the records are already
in the journal, so the writer only fsyncs it (a record the ledger reports durable then survives a power cut too)
and lets the buffer go, while it retries the database with exponential backoff (tenacity). Once the database
answers, the sealed segments are replayed in order, in batches, and deleted. Replays are idempotent, so a replay
interrupted by another failure (or a crash between commit and delete) is simply repeated: nothing is lost, nothing
is doubled. If the journal cannot be written either (disk full), records are kept in memory until the database
takes them.

Restart. ``start`` takes over the journal a dead process left (its lock died with it). Before replaying it, the
writer closes every request that the dead process had released to a backend and never finished — a start with no
timeline in those segments — with status ``ABORTED``: no tokens, no first token (attribution books its window as
waiting for a prefill), ended at the process's last sign of life (the latest time stamped in its segments:
records, heartbeats; at most ``heartbeat_s`` before the death when the writer was alive). The close is an UPDATE of
an open row only (``abort_row``): it can never overwrite a request that did finish. So after a
kill -9 no row stays open longer than until the next start has replayed (seconds), and the backend's attribution,
held back by open rows, resumes. A request whose timeline a live process still holds is never closed this way: the
journal's lock says which process owns it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa
import structlog
import tenacity

from common.errors import JoulegateError
from meter.journal import UNREADABLE, BadLine, Journal, Record, encode
from meter.lifecycle import Lifecycle
from meter.samples import Sample
from meter.store.bulk import SAMPLE_COLUMNS, START_COLUMNS, TIMELINE_COLUMNS, BulkWriter
from meter.store.clock import clock_offset_ns
from meter.store.db import is_outage, make_engine
from meter.store.models import LedgerWriter, Request
from meter.store.upsert import dialect_insert
from meter.timeline import Api, RequestStart, Timeline

log = structlog.get_logger(__name__)

Row = tuple[Any, ...]  # one database row, in meter.store.bulk's column order

# Record kinds, as stored in the journal under "k". A heartbeat carries only "t_ns".
START, TIMELINE, SAMPLE, ABORT, HEARTBEAT = "s", "t", "m", "a", "h"
ABORT_COLUMNS = (*START_COLUMNS, "done_ns")
# Rows are plain tuples in their kind's column order (the cheapest thing to build on the hot path); the few fields
# the ledger itself reads are found by name here.
_ID = 0  # request_id, first in every request row
assert START_COLUMNS[_ID] == TIMELINE_COLUMNS[_ID] == ABORT_COLUMNS[_ID] == "request_id"
_START_RECEIVED = START_COLUMNS.index("received_ns")
_START_RELEASED = START_COLUMNS.index("released_ns")
_ABORT_DONE = ABORT_COLUMNS.index("done_ns")
_SAMPLE_KEY = (SAMPLE_COLUMNS.index("device"), SAMPLE_COLUMNS.index("t_ns"))
_COLUMNS = {START: START_COLUMNS, TIMELINE: TIMELINE_COLUMNS, SAMPLE: SAMPLE_COLUMNS, ABORT: ABORT_COLUMNS}
_TIME_COLUMNS = ("received_ns", "released_ns", "first_token_ns", "done_ns", "t_ns")  # a sign of life, in any record
# Values for columns a journal record written by an older version does not have.
_MISSING = {"prompt_tokens_estimated": False, "cached_tokens": 0}

ABORTED = "ABORTED"  # the status of a request whose process died while it was in flight
MARK_SLACK_NS = 1_000_000_000  # how much less the writer's mark claims than it knows (see _maintain)
_CHECKPOINT_CHUNK = 256  # open requests per journal write of a checkpoint
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_REQUESTS: sa.Table = Request.__table__
_WRITERS: sa.Table = LedgerWriter.__table__


class DatabaseStalledError(JoulegateError, TimeoutError):
    """A write did not return within ``write_timeout_s`` (a hung server, proxy or network): treated as an outage."""


class UnstorableValueError(JoulegateError, ValueError):
    """A value no database column of the ledger can hold (not None, a 64-bit int or a str): refused at the door."""


@dataclass(frozen=True, slots=True)
class LedgerStats:
    buffered: int  # items handed in and not yet taken by the writer
    written_requests: int  # start and timeline rows committed to SQL (directly or by replay)
    written_samples: int  # sample rows committed to SQL (directly or by replay)
    journaled: int  # records the journal kept for the database while it was unavailable
    replayed: int  # journal records replayed into SQL
    rejected: int  # records quarantined (<journal>.rejected): refused at the door or by the database, or undecodable
    aborted: int  # requests a dead process left in flight, closed ABORTED at start (unless their row is finished)
    journal_errors: int  # hand-offs the journal could not take (disk full): those records were held in memory
    db_available: bool  # whether the last database write succeeded
    last_error: str | None  # the last database error, if any
    journal_pending: bool  # the journal holds records not yet in SQL (an outage, or a replay still to run)


# -- rows ----------------------------------------------------------------------------------------------------------


def storable_text(s: str) -> str:
    """``s`` with what no database can store escaped: NUL as ``\\x00``, a lone surrogate as the byte it stands for
    (``\\xff``: aiohttp decodes a non-UTF-8 header byte 0xff to U+DCFF) or as ``\\udXXX``. Valid text is unchanged."""
    s = s.replace("\x00", "\\x00")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(_escape_surrogate(c) for c in s)
    return s


def _escape_surrogate(c: str) -> str:
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:
        return f"\\x{o - 0xDC00:02x}"
    if 0xD800 <= o <= 0xDFFF:
        return f"\\u{o:04x}"
    return c


def _storable(v: Any) -> Any:
    if v is None or type(v) is bool:
        return v
    if isinstance(v, str):
        return storable_text(str.__str__(v))
    if isinstance(v, int):  # bool included
        if _INT64_MIN <= v <= _INT64_MAX:
            return int(v)
        raise UnstorableValueError(f"integer {v} does not fit 64 bits")
    raise UnstorableValueError(f"a value of type {type(v).__name__} ({v!r:.80})")


def storable(row: Row) -> Row:
    """``row`` with every value storable (see the module docstring); raises ``UnstorableValueError``. The common
    case, plain ASCII strings and ints in range, costs one pass and returns ``row`` itself."""
    for v in row:
        t = type(v)
        if t is str:
            if v.isascii() and "\x00" not in v:
                continue
        elif t is int:
            if _INT64_MIN <= v <= _INT64_MAX:
                continue
        elif v is None or t is bool:
            continue
        return tuple(_storable(x) for x in row)
    return row


def start_row(s: RequestStart) -> Row:
    return storable((s.request_id, s.tenant, s.model_id, s.backend, s.received_ns, s.released_ns))


def timeline_row(t: Timeline) -> Row:
    return storable(
        (
            t.request_id,
            t.tenant,
            t.model_id,
            t.backend,
            t.traffic_class,
            t.api.value if isinstance(t.api, Api) else t.api,
            t.status,
            t.correlation_id,
            t.received_ns,
            t.released_ns,
            t.first_token_ns,
            t.done_ns,
            t.prompt_tokens,
            t.prompt_tokens_estimated,
            t.generated_tokens,
            t.cached_tokens,
        )
    )


def sample_rows(samples: Sequence[Sample]) -> list[Row]:
    return [storable((s.device, s.t_ns, s.energy_mj, s.error)) for s in samples]


def abort_row(start: Row, done_ns: int) -> Row:
    """What closes a request its process left in flight: its start and when it ended (``done_ns``, never before
    its release). Written as the start (INSERT, DO NOTHING) and then ``UPDATE ... SET status = 'ABORTED', done_ns
    WHERE done_ns IS NULL``: it closes an open row and never touches a finished one, whatever the order in which
    records reach the database. Tokens stay 0 and class and API NULL: the start does not know them."""
    released = start[_START_RELEASED]
    if released is None:
        released = start[_START_RECEIVED]
    return (*start, max(done_ns, released))


def _lines(kind: str, payload: Row | list[Row]) -> bytes:
    """The journal's lines for a hand-off: ``[kind, *row]`` (``meter.journal``: the segment's header names them)."""
    if kind == SAMPLE:
        return b"".join(encode([kind, *r]) for r in cast("list[Row]", payload))
    return encode([kind, *payload])


def _record_row(kind: str, record: Record) -> Row:
    """A journal record's row; a record written by an older or newer version still maps by column name."""
    return storable(tuple(record.get(c, _MISSING.get(c)) for c in _COLUMNS[kind]))


def _json_safe(v: Any) -> Any:
    if isinstance(v, str):
        return storable_text(v)
    if v is None or isinstance(v, bool | float) or (isinstance(v, int) and _INT64_MIN <= v <= _INT64_MAX):
        return v
    return repr(v)


@dataclass(slots=True)
class _Batch:
    """One batch folded to one row per key, in the order its statements run: starts, timelines, samples, aborts.

    Folding keeps what applying the items one by one would leave: the last timeline of a request, the first start
    (DO NOTHING), the first reading per (device, t_ns); a start whose request the batch also finishes is dropped,
    since the timeline overwrites it anyway. An abort brings its start along and closes the row only if nothing
    else has (``abort_row``).
    """

    starts: dict[str, Row]
    timelines: dict[str, Row]
    samples: dict[tuple[str, int], Row]
    aborts: dict[str, Row]

    @classmethod
    def empty(cls) -> _Batch:
        return cls({}, {}, {}, {})

    def add(self, kind: str, payload: Row | list[Row]) -> None:
        if kind == SAMPLE:
            device, t_ns = _SAMPLE_KEY
            for r in cast("list[Row]", payload):
                self.samples.setdefault((r[device], r[t_ns]), r)
            return
        row = cast("Row", payload)
        request_id: str = row[_ID]
        if kind == TIMELINE:
            self.starts.pop(request_id, None)
            self.timelines[request_id] = row
        elif kind == ABORT:
            self.add(START, row[: len(START_COLUMNS)])
            self.aborts.setdefault(request_id, row)
        elif request_id not in self.timelines:
            self.starts.setdefault(request_id, row)

    def _parts(self) -> tuple[tuple[str, dict[Any, Row]], ...]:
        return ((START, self.starts), (TIMELINE, self.timelines), (SAMPLE, self.samples), (ABORT, self.aborts))

    def to_records(self) -> list[Record]:
        out: list[Record] = []
        for kind, rows in self._parts():
            cols = _COLUMNS[kind]
            out.extend({"k": kind, **dict(zip(cols, row, strict=True))} for row in rows.values())
        return out

    def halves(self) -> tuple[_Batch, _Batch]:
        """Two batches of about half the rows each, the first holding the earlier statements."""
        entries = [(kind, key, row) for kind, rows in self._parts() for key, row in rows.items()]
        mid = len(entries) // 2
        return _Batch._of(entries[:mid]), _Batch._of(entries[mid:])

    @staticmethod
    def _of(entries: list[tuple[str, Any, Row]]) -> _Batch:
        b = _Batch.empty()
        parts = dict(b._parts())
        for kind, key, row in entries:
            parts[kind][key] = row
        return b

    @property
    def requests(self) -> int:
        return len(self.starts) + len(self.timelines) + len(self.aborts)

    def __len__(self) -> int:
        return len(self.starts) + len(self.timelines) + len(self.samples) + len(self.aborts)


_ABORT = (
    sa.update(_REQUESTS)
    .where(_REQUESTS.c.request_id == sa.bindparam("rid"), _REQUESTS.c.done_ns.is_(None))
    .values(status=ABORTED, done_ns=sa.bindparam("done"), ingested_ns=sa.bindparam("now"))
)


# -- what travels through the buffer besides (kind, payload) tuples --------------------------------------------------


class _Marker:
    """Ends a batch. ``flush``: set once every item before it is durable. ``seal``: the journal was rotated here,
    so the sealed segments may go once every item before it is in SQL. ``through_ns``: every item before it was
    handed in before this time, which ``ledger_writers`` records once they are all in SQL."""

    __slots__ = ("done", "seal", "through_ns")

    def __init__(self, *, seal: bool = False, through_ns: int | None = None) -> None:
        self.done = threading.Event()
        self.seal = seal
        self.through_ns = through_ns


@dataclass(frozen=True, slots=True)
class _Unjournaled:
    """A record the journal could not take (disk full): it exists only in memory until the database has it."""

    kind: str
    payload: Row | list[Row]


@dataclass(frozen=True, slots=True)
class _Refused:
    """A record refused at the door: to be quarantined by the writer."""

    kind: str
    what: str
    reason: str


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
        rotate_s: float = 5.0,
        rotate_bytes: int = 16 << 20,
        heartbeat_s: float = 1.0,
        engine_kw: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(url_or_engine, sa.Engine):
            self._engine, self._owns_engine = url_or_engine, False
        else:
            self._engine, self._owns_engine = make_engine(url_or_engine, **(engine_kw or {})), True
        self._bulk = BulkWriter.for_dialect(self._engine.dialect)
        self._journal = Journal(journal_path, _COLUMNS)
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._retry_initial_s = retry_initial_s
        self._retry_max_s = retry_max_s
        self._write_timeout_s = write_timeout_s
        self._rotate_s = rotate_s
        self._rotate_bytes = rotate_bytes
        self._heartbeat_s = heartbeat_s
        # Database calls run on their own thread so that a hung connection (no error, just silence) costs the
        # writer at most write_timeout_s: it then journals and keeps journaling, as for any outage.
        self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="joulegate-ledger-db")
        self._inflight: Future[None] | None = None

        self._lock = threading.Lock()  # journal order == buffer order
        self._buf: deque[object] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = Lifecycle.NEW
        self._late_warned = False
        self._writer_id: str | None = None  # in ledger_writers: the journal's (set by start)
        self._writer_name = f"{socket.gethostname()}:{os.getpid()}"

        # writer thread only
        self._open: dict[str, Row] = {}  # requests started and not finished: the checkpoint
        self._held: list[tuple[str, Row | list[Row]]] = []  # records neither journaled nor in SQL (disk full)
        self._leftovers: list[Path] = []  # segments an earlier process left, until replayed
        self._leftover_stamps: dict[str, int] = {}  # device -> its latest sample in those segments
        self._scanned = threading.Event()  # the leftovers were read (or there were none)
        self._seal_pending = False  # a seal marker is in the buffer
        self._rotated_at = time.monotonic()
        self._heartbeat_at = 0.0
        self._dirty = False  # records written to the journal since its last fsync, while journaling
        self._quarantined: set[bytes] = set()  # quarantine once, even if a replay is retried
        self._records_read = 0  # by the replay running now

        self._written_requests = 0
        self._written_samples = 0
        self._journaled = 0
        self._replayed = 0
        self._rejected_n = 0
        self._aborted = 0
        self._journal_errors = 0
        self._db_available = True
        self._last_error: str | None = None
        self._pending = False  # the journal holds records that are not in SQL yet

    # -- hot path (any thread; microseconds; never blocks on the database, never raises) ---------------------------

    def request_started(self, start: RequestStart) -> None:
        self._hand_in(START, start_row, start)

    def request_finished(self, timeline: Timeline) -> None:
        self._hand_in(TIMELINE, timeline_row, timeline)

    def add_samples(self, samples: Sequence[Sample]) -> None:
        if samples:
            self._hand_in(SAMPLE, sample_rows, samples)

    def _hand_in(self, kind: str, to_payload: Callable[[Any], Any], obj: Any) -> None:
        try:
            payload = to_payload(obj)
            data = _lines(kind, payload)
        except Exception as exc:  # refused at the door: the writer quarantines it
            self._buf.append(_Refused(kind, f"{obj!r:.2000}", f"{type(exc).__name__}: {exc}"))
            self._wake.set()
            return
        item: object = (kind, payload)
        with self._lock:
            try:
                self._journal.write(data)
            except OSError:
                item = _Unjournaled(kind, payload)
            self._buf.append(item)
        if len(self._buf) >= self._batch_size or type(item) is _Unjournaled:
            self._wake.set()
        if self._state is Lifecycle.CLOSED and not self._late_warned:
            self._late_warned = True
            log.warning("ledger_record_after_close")

    # -- lifecycle -------------------------------------------------------------------------------------------------

    @property
    def engine(self) -> sa.Engine:
        return self._engine

    @property
    def journal_path(self) -> Path:
        return self._journal.path

    def start(self) -> None:
        """Open (and lock) the journal and start the writer thread, which first closes and replays what an earlier
        process left in it."""
        if self._state is not Lifecycle.NEW:
            return
        with self._lock:
            self._leftovers = self._journal.open()
        self._writer_id = self._journal.writer_id()
        self._pending = bool(self._leftovers)
        if self._pending:
            log.info("ledger_journal_found", path=str(self._journal.path))
        else:
            self._scanned.set()
        self._thread = threading.Thread(target=self._run, name="joulegate-ledger", daemon=True)
        self._state = Lifecycle.RUNNING
        self._thread.start()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything handed in before this call is durable: in SQL, or fsync'd in the journal while the
        database is away.

        Blocks up to ``timeout_s``; returns False if that was not enough (e.g. the database hangs and
        ``write_timeout_s`` is longer). From a coroutine, call it through ``asyncio.to_thread``.
        """
        thread = self._thread
        if thread is None or not thread.is_alive():
            return not self._buf
        marker = _Marker()
        self._buf.append(marker)
        self._wake.set()
        return marker.done.wait(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush, stop the writer and close the journal. Records the database did not take stay in the journal."""
        if self._state is Lifecycle.CLOSED:
            return
        deadline = time.monotonic() + timeout_s
        if not self.flush(timeout_s):
            log.warning("ledger_close_timed_out", buffered=len(self._buf))
        self._state = Lifecycle.CLOSED
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("ledger_writer_still_busy")
                return
        stuck = self._inflight is not None and not self._inflight.done()
        self._db.shutdown(wait=not stuck, cancel_futures=True)
        with self._lock:
            self._journal.close()
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
            aborted=self._aborted,
            journal_errors=self._journal_errors,
            db_available=self._db_available,
            last_error=self._last_error,
            journal_pending=self._pending,
        )

    # -- writer thread ---------------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if self._leftovers:
                try:
                    self._take_over(self._leftovers)
                finally:
                    self._scanned.set()
            if self._pending:
                self._recover(first_wait_s=0.0)
            while True:
                self._maintain()
                items, marker = self._take()
                if items:
                    batch = self._absorb(items)
                    if batch:
                        try:
                            self._write(batch)
                        except Exception as exc:
                            self._note_failure(exc)
                            self._keep_in_journal(items)
                            self._go_journaling()
                            if marker is not None:
                                if marker.seal:
                                    self._seal_pending = False  # its segments are replayed with the rest
                                else:
                                    self._release(marker)
                            self._recover(first_wait_s=self._retry_initial_s)
                            continue
                if marker is not None:
                    self._at_marker(marker)
                if items or marker is not None:
                    continue
                if self._stopping.is_set():
                    self._finish()
                    return
                self._wake.wait(self._flush_interval_s)
                self._wake.clear()
        except BaseException:  # a bug: say so loudly; the hot path keeps journaling, the next start replays
            log.exception("ledger_writer_died")
            raise

    def _take(self) -> tuple[list[object], _Marker | None]:
        """Up to ``batch_size`` rows from the buffer; a marker ends the batch."""
        items: list[object] = []
        rows = 0
        buf = self._buf
        while rows < self._batch_size:
            try:
                item = buf.popleft()
            except IndexError:
                break
            if type(item) is _Marker:
                return items, item
            items.append(item)
            rows += len(item[1]) if type(item) is tuple and item[0] == SAMPLE else 1
        return items, None

    def _absorb(self, items: Iterable[object]) -> _Batch:
        """Fold items into a batch, keep the set of open requests, quarantine refused records."""
        batch = _Batch.empty()
        open_ = self._open
        for item in items:
            if type(item) is tuple:
                kind, payload = item
            elif type(item) is _Unjournaled:
                kind, payload = item.kind, item.payload
                self._journal_errors += 1
                if self._journal_errors == 1 or self._journal_errors % 1000 == 0:
                    log.error("ledger_journal_write_failed", count=self._journal_errors)
            elif type(item) is _Refused:
                self._quarantine([{"k": item.kind, "record": item.what}], item.reason)
                continue
            else:
                log.error("ledger_unknown_object", type=type(item).__name__)
                continue
            if kind == START:
                open_.setdefault(payload[_ID], cast("Row", payload))
            elif kind != SAMPLE:
                open_.pop(payload[_ID], None)
            batch.add(kind, payload)
        return batch

    def _keep_in_journal(self, items: Iterable[object]) -> None:
        """The database is away: ``items`` stay in the journal for it; those the journal lacks are written to it
        now, or held in memory."""
        for item in items:
            if type(item) is tuple:
                self._journaled += len(item[1]) if item[0] == SAMPLE else 1
            elif type(item) is _Unjournaled:
                self._journal_late(item)
        self._dirty = True

    def _at_marker(self, marker: _Marker) -> None:
        """Everything before ``marker`` is in SQL (normal mode)."""
        if marker.seal:
            self._seal_pending = False
            self._checkpoint_and_delete()
        if marker.through_ns is not None and not self._pending and not self._held:
            self._on_db_quietly(self._write_through, marker.through_ns)
        self._release(marker)

    def _release(self, marker: _Marker) -> None:
        marker.done.set()

    def _maintain(self) -> None:
        """Heartbeat and how-far mark; seal the journal's segment when it is old or large enough (never two seals at
        once)."""
        now = time.monotonic()
        if now - self._heartbeat_at >= self._heartbeat_s:
            self._heartbeat_at = now
            with self._lock:
                with contextlib.suppress(OSError):  # a full disk shows in the records' own writes
                    self._journal.write(encode({"k": HEARTBEAT, "t_ns": time.time_ns()}))
                # Under the lock: every record before the mark in the buffer was handed in before it. Less the slack:
                # the gateway stamps released_ns a few statements before it hands the start in, and its thread can
                # lose the GIL (or the CPU) in between; the meter reads the mark as "every request released before
                # this is known".
                self._buf.append(_Marker(through_ns=time.time_ns() - MARK_SLACK_NS))
        size = self._journal.current_size
        if self._seal_pending or not self._journal.is_open:
            return
        # While journaling nothing can be deleted: seal by size only, not by age (no file every few seconds).
        aged = not self._pending and now - self._rotated_at >= self._rotate_s and size > 0
        if size >= self._rotate_bytes or aged:
            self._seal()

    def _seal(self) -> None:
        marker = _Marker(seal=True)
        with self._lock:
            try:
                self._journal.rotate()
            except OSError as exc:
                log.error("ledger_journal_rotate_failed", error=str(exc))
                return
            self._buf.append(marker)
        self._settle()
        self._seal_pending = True
        self._rotated_at = time.monotonic()

    def _checkpoint_and_delete(self) -> None:
        """The sealed segments' records are all in SQL: carry the open requests over to the current segment, then
        delete the sealed ones. (A crash between the two leaves both: replays are idempotent.)"""
        sealed = self._journal.sealed
        lines = [_lines(START, row) for row in self._open.values()]
        for i in range(0, len(lines), _CHECKPOINT_CHUNK):
            with self._lock:  # in chunks: thousands in flight must not hold the hot path up for long
                try:
                    self._journal.write(b"".join(lines[i : i + _CHECKPOINT_CHUNK]))
                except OSError as exc:
                    log.error("ledger_journal_checkpoint_failed", error=str(exc))
                    return
        self._journal.remove(sealed)

    def _finish(self) -> None:
        """The writer stops. All in SQL: seal, checkpoint whatever is still open, drop an empty segment. Else the
        journal keeps everything, fsync'd, for the next start."""
        if self._pending or not self._journal.is_open:
            self._sync_journal()
            return
        with self._lock:
            self._journal.rotate()
        self._settle()
        self._checkpoint_and_delete()
        with self._lock:
            if not self._journal.remove_current_if_empty():
                self._journal.write(encode({"k": HEARTBEAT, "t_ns": time.time_ns()}))
        self._on_db_quietly(self._forget_writer, None)  # stopped with everything in SQL: it holds no seal back

    # -- outage ----------------------------------------------------------------------------------------------------

    def _go_journaling(self) -> None:
        self._pending = True
        try:
            self._journal.sync_all()
        except OSError as exc:
            log.error("ledger_journal_fsync_failed", error=str(exc))
        self._dirty = False

    def _settle(self, *, sync: bool | None = None) -> None:
        """Close sealed segments; fsync them first while their records are not in SQL (journaling)."""
        try:
            self._journal.settle(sync=self._pending if sync is None else sync)
        except OSError as exc:
            log.error("ledger_journal_segment_fsync_failed", error=str(exc))

    def _sync_journal(self) -> None:
        try:
            self._journal.sync()
        except OSError as exc:
            log.error("ledger_journal_fsync_failed", error=str(exc))
        self._dirty = False

    def _note_failure(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        if self._db_available:
            log.warning("ledger_database_unavailable", error=self._last_error)
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
            retrying(self._replay)
        except Exception as exc:  # only when stopping: the journal keeps the records for the next start
            self._note_failure(exc)
            self._sleep_journaling(0)
            log.warning("ledger_stopped_with_journal", path=str(self._journal.path))

    def _before_retry(self, state: tenacity.RetryCallState) -> None:
        if state.outcome is not None and (exc := state.outcome.exception()) is not None:
            self._note_failure(exc)
        log.info(
            "ledger_database_still_unavailable",
            attempt=state.attempt_number,
            retry_in_s=round(state.upcoming_sleep, 3),
            journaled=self._journaled,
        )

    def _sleep_journaling(self, seconds: float) -> None:
        """Wait ``seconds`` while the database is away: take what arrives (its records are in the journal), fsync
        the journal, release flushes waiting on it."""
        deadline = time.monotonic() + seconds
        while True:
            self._maintain()
            while True:
                items, marker = self._take()
                if items:
                    self._absorb(items)  # the open set stays current; refused records are quarantined
                    self._keep_in_journal(items)
                if marker is not None:
                    if marker.seal:
                        self._seal_pending = False  # its segments are replayed with the rest
                    else:
                        if self._dirty:
                            self._sync_journal()
                        self._release(marker)
                if not items and marker is None:
                    break
            if self._dirty:
                self._sync_journal()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping.is_set():
                return
            self._wake.wait(min(remaining, self._flush_interval_s))
            self._wake.clear()

    def _journal_late(self, item: _Unjournaled) -> None:
        """Journal a record whose hand-off could not (the disk may have room again); else hold it in memory."""
        with self._lock:
            try:
                self._journal.write(_lines(item.kind, item.payload))
            except OSError:
                self._held.append((item.kind, item.payload))
                return
        self._journaled += 1

    def _replay(self) -> None:
        """Seal the current segment, write every sealed segment to SQL in order, delete them. Raises on an outage.

        The records handed in before the seal are all in those segments (or held in memory): once they are written,
        the buffer up to the seal marker is dropped instead of written twice.
        """
        t0 = time.monotonic()
        self._run_on_db(_probe, self._engine)  # still away: raise before sealing anything
        marker = _Marker(seal=True)
        with self._lock:
            if self._journal.is_open:
                self._journal.rotate()
            self._buf.append(marker)
        self._settle(sync=True)
        self._seal_pending = True
        sealed = self._journal.sealed
        self._records_read = 0
        for chunk in self._read_chunks(sealed):
            self._write(chunk)
        replayed = self._records_read
        if self._held:
            batch = _Batch.empty()
            for kind, payload in self._held:
                batch.add(kind, payload)
            self._write(batch)
            self._held.clear()
        # The buffer up to the marker: in the segments just written. Keep the open set current, release flushes.
        while True:
            items, m = self._take()
            self._absorb(items)
            for item in items:
                if type(item) is _Unjournaled:
                    self._held.append((item.kind, item.payload))
            if m is marker:
                break
            if m is not None and not m.seal:
                self._release(m)
            if m is None and not items:
                break  # cannot happen (the marker is in the buffer); never spin
        self._seal_pending = False
        if self._held:  # records that raced in unjournaled: write them now
            batch = _Batch.empty()
            for kind, payload in self._held:
                batch.add(kind, payload)
            self._write(batch)
            self._held.clear()
        self._checkpoint_and_delete()
        self._leftovers = []
        self._pending = False
        self._replayed += replayed
        if not self._db_available or replayed:
            log.info("ledger_journal_replayed", records=replayed, s=round(time.monotonic() - t0, 3))
        self._db_available = True

    def _read_chunks(self, segments: Sequence[Path]) -> Iterator[_Batch]:
        """The segments' records as batches of at most ``batch_size``, in order; lines that do not decode and
        records that cannot be stored are quarantined on the way."""
        batch = _Batch.empty()
        for segment in segments:
            for record in Journal.read(segment):
                if isinstance(record, BadLine):
                    raw = record.raw.decode("utf-8", "backslashreplace")
                    where = {"segment": record.segment.name, "line": record.lineno}
                    if record.reason.startswith(UNREADABLE):  # not a record's fault: keep the file for people
                        where["set_aside_as"] = self._journal.set_aside(segment).name
                    self._quarantine([{"k": "?", **where, "raw": raw}], record.reason)
                    continue
                kind = record.get("k")
                if kind == HEARTBEAT:
                    continue
                if kind not in _COLUMNS:
                    self._quarantine([record], f"a journal record of unknown kind {kind!r}")
                    continue
                try:
                    row = _record_row(kind, record)
                except UnstorableValueError as exc:
                    self._quarantine([record], str(exc))
                    continue
                self._records_read += 1
                batch.add(kind, [row] if kind == SAMPLE else row)
                if len(batch) >= self._batch_size:
                    yield batch
                    batch = _Batch.empty()
        if batch:
            yield batch

    # -- restart ---------------------------------------------------------------------------------------------------

    def journaled_stamps(self, devices: Sequence[str], timeout_s: float = 10.0) -> dict[str, int]:
        """The stamp of each of ``devices``' latest sample in the journal segments an earlier process left (those
        that have one): samples the database may not hold yet, because the replay runs after ``start``. Waits up to
        ``timeout_s`` for the writer to have read them (an empty answer past that, logged). Any thread."""
        if not self._scanned.wait(timeout_s):
            log.warning("ledger_journal_not_read_yet", devices=list(devices), timeout_s=timeout_s)
            return {}
        return {d: self._leftover_stamps[d] for d in devices if d in self._leftover_stamps}

    def _take_over(self, segments: Sequence[Path]) -> None:
        """Read the segments a dead process left: close the requests it left in flight (starts without a timeline)
        and note where each device's samples end (``journaled_stamps``)."""
        starts: dict[str, Row] = {}
        finished: set[str] = set()
        last_alive_ns = 0
        stamps = self._leftover_stamps
        for segment in segments:
            for record in Journal.read(segment):
                if isinstance(record, BadLine):
                    continue
                kind = record.get("k")
                for c in _TIME_COLUMNS:
                    v = record.get(c)
                    if type(v) is int and v > last_alive_ns:
                        last_alive_ns = v
                if kind == SAMPLE:
                    device, t_ns = record.get("device"), record.get("t_ns")
                    if isinstance(device, str) and type(t_ns) is int:
                        stamps[device] = max(t_ns, stamps.get(device, t_ns))
                    continue
                rid = record.get("request_id")
                if not isinstance(rid, str):
                    continue
                if kind in (TIMELINE, ABORT):
                    finished.add(rid)
                elif kind == START:
                    try:
                        starts.setdefault(rid, _record_row(START, record))
                    except UnstorableValueError:
                        continue  # quarantined by the replay
        orphans = [row for rid, row in starts.items() if rid not in finished]
        for row in orphans:
            self._hand_in(ABORT, lambda r: abort_row(r, last_alive_ns), row)
        if orphans:
            self._aborted += len(orphans)
            log.warning(
                "ledger_aborted_requests_closed",
                requests=len(orphans),
                status=ABORTED,
                ended_ns=last_alive_ns,
            )

    # -- quarantine ------------------------------------------------------------------------------------------------

    def _quarantine(self, records: list[Record], reason: str) -> None:
        reason = reason.splitlines()[0][:500] if reason else "refused"
        safe = [{**{k: _json_safe(v) for k, v in r.items()}, "rejected_because": reason} for r in records]
        fresh = []
        for r in safe:
            key = encode(r)
            if key not in self._quarantined:
                self._quarantined.add(key)
                fresh.append(r)
        if not fresh:
            return
        log.error(
            "ledger_records_quarantined",
            error=reason,
            records=len(fresh),
            path=str(self._journal.rejected_path),
            record=fresh[:3],
        )
        self._rejected_n += len(fresh)
        try:
            self._journal.reject(fresh)
        except OSError as exc:
            log.error("ledger_quarantine_write_failed", error=str(exc))

    # -- SQL -------------------------------------------------------------------------------------------------------

    def _write(self, batch: _Batch) -> None:
        """Write a batch in one transaction. Raises on an outage; isolates and quarantines records the database
        refuses for good, writing all the others."""
        try:
            self._execute(batch)
        except Exception as exc:
            if is_outage(exc):
                raise
            log.warning("ledger_batch_refused", error=_first(exc))
            self._isolate(batch, exc)
            return
        self._count(batch)

    def _isolate(self, batch: _Batch, exc: BaseException) -> None:
        """Bisect ``batch`` (which the database refused with ``exc``) down to the records it refuses."""
        if len(batch) <= 1:
            self._quarantine(batch.to_records(), f"{type(exc).__name__}: {_first(exc)}")
            return
        for half in batch.halves():
            if not half:
                continue
            try:
                self._execute(half)
            except Exception as sub:
                if is_outage(sub):
                    raise
                self._isolate(half, sub)
            else:
                self._count(half)

    def _count(self, batch: _Batch) -> None:
        self._db_available = True
        self._written_requests += batch.requests
        self._written_samples += len(batch.samples)

    def _execute(self, batch: _Batch) -> None:
        """Run the batch's transaction on the database thread, waiting at most ``write_timeout_s``.

        A write that times out may still commit later; its records stay in the journal and are replayed afterwards,
        which the idempotent upserts make harmless. No new write starts while a stuck one is in flight, so writes
        never overtake each other.
        """
        self._run_on_db(self._execute_now, batch)

    def _run_on_db(self, fn: Callable[[Any], None], arg: Any) -> None:
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            raise DatabaseStalledError("an earlier write to the database has not returned yet")
        self._inflight = future = self._db.submit(fn, arg)
        try:
            future.result(timeout=self._write_timeout_s)
        except TimeoutError:
            if future.done():  # the write itself raised a TimeoutError (e.g. the pool's)
                raise
            raise DatabaseStalledError(f"a write to the database took longer than {self._write_timeout_s} s") from None

    def _execute_now(self, batch: _Batch) -> None:
        now_ns = time.time_ns()
        with self._engine.begin() as conn:
            self._bulk.write(
                conn,
                list(batch.starts.values()),
                list(batch.timelines.values()),
                list(batch.samples.values()),
                now_ns,
            )
            if batch.aborts:
                conn.execute(
                    _ABORT, [{"rid": r[_ID], "done": r[_ABORT_DONE], "now": now_ns} for r in batch.aborts.values()]
                )

    def _on_db_quietly(self, fn: Callable[[Any], None], arg: Any) -> None:
        """``fn(arg)`` on the database thread; a failure is logged only (the next heartbeat says it again, and an
        outage shows in the records' own writes)."""
        try:
            self._run_on_db(fn, arg)
        except Exception as exc:
            log.info("ledger_writer_mark_not_written", error=_first(exc))

    def _write_through(self, through_ns: int) -> None:
        with self._engine.begin() as conn:
            insert = dialect_insert(self._engine)(_WRITERS).values(
                writer_id=self._writer_id,
                name=self._writer_name,
                through_ns=through_ns,
                clock_offset_ns=clock_offset_ns(conn),
            )
            stmt = insert.on_conflict_do_update(
                index_elements=["writer_id"],
                set_={
                    "name": insert.excluded.name,
                    "through_ns": insert.excluded.through_ns,  # a slow round trip measured nothing: keep the last
                    "clock_offset_ns": sa.func.coalesce(insert.excluded.clock_offset_ns, _WRITERS.c.clock_offset_ns),
                },
            )
            conn.execute(stmt)

    def _forget_writer(self, _arg: None) -> None:
        with self._engine.begin() as conn:
            conn.execute(sa.delete(_WRITERS).where(_WRITERS.c.writer_id == self._writer_id))


def _probe(engine: sa.Engine) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")


def _first(exc: BaseException) -> str:
    return (str(exc).splitlines() or [""])[0][:500]
