"""The ledger's write-ahead journal: every record handed to the ledger is on local disk before the hand-off returns.

Why. The ledger batches records in memory and writes them to SQL every ``flush_interval_s``; a process kill
(kill -9, the OOM killer, a crash) would lose whatever sat in memory, and leave the rows of requests in flight open
for ever. So each hand-off appends its record to the current segment of this journal with one plain ``write()``:
once that returns, the line is in the kernel's page cache, which outlives the process. No fsync per record — a few
microseconds. The next start replays what the dead process left (``meter.ledger``).

Lines. A segment starts with a header naming the columns of each record kind, ``{"k": "columns", "t": [...]}``;
then each record is a JSON array ``[kind, value, ...]`` in those columns' order: about ten times cheaper to encode
than an object with named fields (the part of the hand-off that grows with the row), and still read by column name,
so a segment written by an older or newer version maps onto this version's columns. A line that is a JSON object is
a record with named fields (``{"k": kind, column: value, ...}``, as joulegate 0.1 wrote every line).

Files. ``path`` names a family of files side by side:

- ``<path>.<n>`` (n = 1, 2, ...): segments, one record a line, in hand-off order. The highest n is the current
  one, appended by this process only; the ledger seals it (``rotate``) and deletes sealed segments once every
  record in them is in SQL;
- ``<path>``: a single-file journal written by joulegate 0.1 (the same lines); replayed first, like a segment;
- ``<path>.rejected``: the quarantine, records the database can never take (JSON lines, fsync'd, kept for people);
- ``<path>.lock``: an exclusive ``flock`` on it marks the owner: two processes sharing one journal would replay and
  delete each other's records, so the second one fails at ``open`` with ``JournalLockedError``. The lock dies
  with its process, so a killed gateway's successor takes the journal over at once;
- ``<path>.writer``: the id the journal's owner goes by in the database (``ledger_writers``), so that a successor
  goes on under the dead process's id.

Durability. A plain write survives a process kill, not a power cut. ``sync``, ``sync_all`` and ``settle(sync=True)``
(fsync) cover that: the ledger calls them while the database is unreachable (records then live only here), before
it reports them durable, and never while holding the lock the hand-offs take.

Damage. A crash mid-write leaves at most a torn last line in a segment; a failed write (disk full) may leave a
partial line in the current one, so the next write starts on a new line and the partial line can never glue onto a
good record. ``read`` yields a ``BadLine`` for every line that does not decode, for the ledger to quarantine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

from common.errors import JoulegateError

Record = dict[str, Any]
_WRITER_ID = re.compile(r"[0-9a-f]{32}")


class JournalLockedError(JoulegateError, RuntimeError):
    """Another process holds this journal."""


@dataclass(frozen=True, slots=True)
class BadLine:
    """A line of a segment that is not a record: torn by a crash, or damaged."""

    segment: Path
    lineno: int
    raw: bytes
    reason: str


def encode(record: Record | list[Any]) -> bytes:
    """One journal line (with its newline). Raises on a value JSON cannot hold (a lone surrogate, a huge int)."""
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def decode(line: bytes) -> Any:
    """A journal line's value. joulegate 0.1 wrote lone surrogates as ``\\udcff`` escapes, which orjson refuses and
    the standard library reads back: such a line still decodes (the ledger then escapes the surrogate)."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        return json.loads(line)


HEADER = "columns"  # the kind of a segment's header line


UNREADABLE = "unreadable"  # the reason of a BadLine for a segment the system cannot read (I/O error, permissions)


def _records(segment: Path, f: IO[bytes]) -> Iterator[Record | BadLine]:
    columns: dict[str, list[str]] = {}
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        if not line.endswith(b"\n"):
            yield BadLine(segment, lineno, line, "a partially written last line (a crash during a write)")
            continue
        try:
            value = decode(line)
        except ValueError:
            yield BadLine(segment, lineno, line, "not valid JSON")
            continue
        if isinstance(value, dict):
            if value.get("k") == HEADER:
                columns = {k: v for k, v in value.items() if k != "k" and isinstance(v, list)}
            else:
                yield value
            continue
        kind = value[0] if isinstance(value, list) and value else None
        names = columns.get(kind) if isinstance(kind, str) else None
        if names is None or len(names) != len(value) - 1:
            yield BadLine(segment, lineno, line, "not a record (no column header names this kind)")
            continue
        yield {"k": kind, **dict(zip(names, value[1:], strict=True))}


class Journal:
    """Segments of JSON lines. ``write`` and ``rotate`` need the caller's lock (the ledger's); the rest belongs to
    the ledger's writer thread. ``columns`` names, per record kind, the fields of its array lines."""

    def __init__(self, path: str | Path, columns: Mapping[str, Sequence[str]] | None = None) -> None:
        self.path = Path(path)
        self._header = encode({"k": HEADER, **{k: list(v) for k, v in (columns or {}).items()}})
        self._needs_header = True
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._seq = 0
        self._size = 0  # bytes in the current segment
        self._torn = False  # a write failed part-way: the next one starts on a new line
        self._sealed: list[Path] = []  # segments not deleted yet, oldest first, the current one excluded
        self._rejected_fd: int | None = None
        self._unsettled: list[int] = []  # sealed segments' open files, for settle
        self._segment_re = re.compile(re.escape(self.path.name) + r"\.(\d+)")

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def open(self) -> list[Path]:
        """Lock the journal, open a new current segment; returns the segments an earlier run left (oldest first)."""
        if self._fd is not None:
            return list(self._sealed)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(self._sibling(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise JournalLockedError(f"journal {self.path} is in use by another process") from None
        self._lock_fd = lock_fd
        numbered = sorted(
            (int(m.group(1)), p) for p in self.path.parent.iterdir() if (m := self._segment_re.fullmatch(p.name))
        )
        self._sealed = ([self.path] if self.path.is_file() else []) + [p for _n, p in numbered]
        self._seq = numbered[-1][0] if numbered else 0
        self._open_next()
        return list(self._sealed)

    def close(self) -> None:
        self.settle(sync=False)
        for fd in (self._fd, self._rejected_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._rejected_fd = None
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def writer_id(self) -> str:
        """The id this journal's writer goes by in the database (``<path>.writer``; made, random, the first time).
        A file that cannot be kept gives an id for this process only: its successor then starts a new one."""
        p = self._sibling(".writer")
        with contextlib.suppress(OSError, UnicodeDecodeError):
            kept = p.read_text().strip()
            if _WRITER_ID.fullmatch(kept):
                return kept
        made = os.urandom(16).hex()
        with contextlib.suppress(OSError):
            p.write_text(made + "\n")
        return made

    def _open_next(self) -> None:
        self._seq += 1
        self._fd = os.open(self._sibling(f".{self._seq:08d}"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._size = 0
        self._torn = False
        self._needs_header = True  # written in front of the segment's first line

    # -- state -----------------------------------------------------------------------------------------------------

    @property
    def current(self) -> Path:
        return self._sibling(f".{self._seq:08d}")

    @property
    def current_size(self) -> int:
        return self._size

    @property
    def sealed(self) -> list[Path]:
        """Segments awaiting replay or deletion, oldest first (the current one excluded)."""
        return list(self._sealed)

    @property
    def rejected_path(self) -> Path:
        return self._sibling(".rejected")

    # -- writing (caller holds the ledger's lock) ------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Append ``data`` (whole lines) to the current segment with plain writes. Raises OSError (disk full...)."""
        fd = self._fd
        if fd is None:
            raise OSError("journal is not open")
        if self._needs_header:
            data = self._header + data
        if self._torn:
            data = b"\n" + data
        view = memoryview(data)
        try:
            while view:
                written = os.write(fd, view)
                view = view[written:]
                self._size += written
        except OSError:
            if len(view) != len(data):  # part of it landed: cut it off from whatever comes next
                self._torn = True
            raise
        self._torn = self._needs_header = False

    def rotate(self) -> Path:
        """Seal the current segment and start a new one (under the caller's lock: two syscalls). The sealed one's
        file stays open until ``settle``, which may fsync it without holding the lock up. Returns the sealed path."""
        old_fd, old = self._fd, self.current
        if old_fd is None:
            raise OSError("journal is not open")
        self._open_next()
        self._unsettled.append(old_fd)
        self._sealed.append(old)
        return old

    def settle(self, *, sync: bool) -> None:
        """Close the segments sealed since the last call, fsync'ing them first if ``sync`` (their records are not
        in SQL yet). Needs no lock: only the writer thread rotates."""
        while self._unsettled:
            fd = self._unsettled.pop(0)
            try:
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)

    # -- writer thread ---------------------------------------------------------------------------------------------

    def sync(self) -> None:
        """Make everything written to the current segment durable against a power cut (sealed segments were synced
        when sealed, where that mattered)."""
        if self._fd is not None:
            os.fsync(self._fd)

    def sync_all(self) -> None:
        """``sync`` for every segment not deleted yet: the sealed ones were closed unsynced while the database took
        their records (their records now wait for it)."""
        for p in self._sealed:
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        self.sync()

    def remove(self, segments: Iterable[Path]) -> None:
        """Delete sealed segments whose records are all in SQL."""
        gone = set(segments)
        for p in gone:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._sealed = [p for p in self._sealed if p not in gone]

    def remove_current_if_empty(self) -> bool:
        """At a clean close: drop the current segment when it holds nothing. True if it did."""
        if self._fd is None or self._size:
            return False
        os.close(self._fd)
        self._fd = None
        with contextlib.suppress(FileNotFoundError):
            self.current.unlink()
        return True

    @staticmethod
    def read(segment: Path) -> Iterator[Record | BadLine]:
        """The records of a segment in order, each as ``{"k": kind, column: value, ...}``; a line that is not a
        record (torn, not JSON, an array of a kind its segment's header does not name) comes as a ``BadLine``."""
        try:
            f = segment.open("rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            yield BadLine(segment, 0, b"", f"{UNREADABLE}: {exc}")
            return
        try:
            with f:
                yield from _records(segment, f)
        except OSError as exc:  # an I/O error part-way
            yield BadLine(segment, 0, b"", f"{UNREADABLE}: {exc}")

    def set_aside(self, segment: Path) -> Path:
        """Rename a segment that cannot be read to ``<segment>.unreadable`` (for people), out of the replay."""
        aside = segment.with_name(segment.name + ".unreadable")
        with contextlib.suppress(OSError):
            segment.rename(aside)
        self._sealed = [p for p in self._sealed if p != segment]
        return aside

    def reject(self, records: list[Record]) -> None:
        """Append records to the quarantine file, durably (fsync)."""
        if not records:
            return
        if self._rejected_fd is None:
            self._rejected_fd = os.open(self.rejected_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        data = b"".join(encode(r) for r in records)
        view = memoryview(data)
        while view:
            view = view[os.write(self._rejected_fd, view) :]
        os.fsync(self._rejected_fd)
