"""A local append-only journal of JSON lines: where the ledger puts rows while the database is unreachable.

One line per record, a JSON object. ``append`` writes a whole batch, flushes and fsyncs before returning, so a
batch the ledger reports as journaled survives a process crash or power loss. ``truncate`` empties the file once
its records are in the database (also fsync'd); a crash between the database commit and the truncate only means
the records are replayed again, which the ledger's idempotent upserts make harmless.

Damage from a crash in the middle of an ``append`` is confined to the last line: it lacks its newline, or is not
valid JSON. Opening the journal cuts such a tail off (with a warning) before anything new is appended, so it can
never glue onto the next record, and ``read`` skips an undecodable line with a warning too.

An exclusive ``flock`` guards the file: two processes sharing one journal would replay and truncate each other's
records, so the second one fails at open with ``JournalLockedError``.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# ensure_ascii: a lone surrogate in a string must still encode (as a \u escape) and decode back.
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, check_circular=False).encode
_loads = json.loads


class JournalLockedError(RuntimeError):
    """Another process holds this journal."""


class Journal:
    """An fsync'd JSON-lines file of records (dicts). Not thread-safe: one writer thread owns it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._records: int | None = None  # lines in the file, counted lazily

    # -- lifecycle -------------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating it if needed), lock, and cut off a partially written last line."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLockedError(f"journal {self.path} is in use by another process") from None
        self._fd = fd
        self._cut_partial_tail()

    def close(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise RuntimeError("journal is not open")
        return self._fd

    # -- state -----------------------------------------------------------------------------------------------------

    def size_bytes(self) -> int:
        return os.fstat(self.fd).st_size

    def is_empty(self) -> bool:
        return self.size_bytes() == 0

    def __len__(self) -> int:
        """Number of records (lines) in the journal."""
        if self._records is None:
            self._records = sum(1 for _ in self._lines())
        return self._records

    # -- writing ---------------------------------------------------------------------------------------------------

    def append(self, records: Iterable[dict[str, Any]]) -> int:
        """Append ``records`` and make them durable (write, fsync). Returns how many were written."""
        lines = [_dumps(r) for r in records]
        if not lines:
            return 0
        data = ("\n".join(lines) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:
            written = os.write(self.fd, view)
            view = view[written:]
        os.fsync(self.fd)
        if self._records is not None:
            self._records += len(lines)
        return len(lines)

    def truncate(self) -> None:
        """Empty the journal durably."""
        os.ftruncate(self.fd, 0)
        os.fsync(self.fd)
        self._records = 0

    # -- reading ---------------------------------------------------------------------------------------------------

    def _lines(self) -> Iterator[bytes]:
        _ = self.fd  # raises unless open
        with open(self.path, "rb") as f:  # its own file position: appends never move it
            yield from f

    def read(self) -> Iterator[dict[str, Any]]:
        """Every record, oldest first; undecodable lines are skipped with a warning."""
        for lineno, line in enumerate(self._lines(), start=1):
            if not line.endswith(b"\n"):
                log.warning("journal: skipping a partially written last line", path=str(self.path), line=lineno)
                continue
            try:
                record = _loads(line)
            except ValueError:
                log.warning("journal: skipping an undecodable line", path=str(self.path), line=lineno)
                continue
            if isinstance(record, dict):
                yield record
            else:
                log.warning("journal: skipping a line that is not a record", path=str(self.path), line=lineno)

    def read_chunks(self, chunk_records: int) -> Iterator[list[dict[str, Any]]]:
        chunk: list[dict[str, Any]] = []
        for record in self.read():
            chunk.append(record)
            if len(chunk) >= chunk_records:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    # -- repair ----------------------------------------------------------------------------------------------------

    def _cut_partial_tail(self) -> None:
        size = self.size_bytes()
        if size == 0:
            return
        # Find the last newline, reading backwards in blocks.
        block = 1 << 16
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - block)
            chunk = os.pread(self.fd, end - start, start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            end = start
        if keep < size:
            log.warning(
                "journal: cutting off a partially written last line (a crash during append)",
                path=str(self.path),
                bytes=size - keep,
            )
            os.ftruncate(self.fd, keep)
            os.fsync(self.fd)
