"""Incremental Server-Sent Events decoding: bytes in, the ``data`` payload of each complete event out.

TGI streams ``data:{json}\\n\\n`` per token. Chunks from the network split events anywhere (inside a line, inside a
multi-byte character), so the decoder buffers bytes until a blank line ends an event. Lines are split on
``\\n`` with an optional ``\\r`` before it, per the SSE spec; ``event:``/``id:``/``retry:`` fields and ``:``
comments are ignored (TGI sends none that matter), multi-line data is joined with ``\\n``.
"""

from __future__ import annotations

from typing import Any

import orjson


class SSEDecoder:
    __slots__ = ("_buf", "_data")

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        """Add bytes; return the data of every event completed by them, in order."""
        buf = self._buf + chunk if self._buf else chunk
        events: list[str] = []
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = buf[start:nl]
            start = nl + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            if line.startswith(b"data:"):
                value = line[5:]
                if value.startswith(b" "):
                    value = value[1:]
                self._data.append(value.decode("utf-8", errors="replace"))
            # other fields and comments are ignored
        self._buf = buf[start:]
        return events

    def close(self) -> list[str]:
        """End of stream: an event not terminated by a blank line is still delivered (TGI always terminates)."""
        events = self.feed(b"\n") if self._buf else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events


class PlainShape:
    """What makes an event *plain* for one wire format: byte counts over a run of complete ``data:{...}`` events that
    prove every event in it is an ordinary token event (one token), which the gateway needs to count, not to read.

    ``end``: how every plain event's JSON ends (e.g. ``,"details":null}``: the last top-level key, null, so no
    details whatever came before it); ``each``: byte strings that occur exactly once in every plain event (e.g.
    ``"token":{``). An event with ``"error"`` anywhere is never plain. Key patterns with unescaped quotes can only be
    keys, never inside a JSON string (whose quotes are escaped). The checks are conservative: an event they do not
    prove plain is parsed.
    """

    __slots__ = ("each", "last", "sep")

    def __init__(self, end: bytes, each: tuple[bytes, ...]) -> None:
        assert end.endswith(b"}")
        self.last = end + b"\n\n"  # how a run ends
        self.sep = end + b"\n\ndata:{"  # between two plain events
        self.each = each

    def plain(self, run: bytes) -> PlainRun | None:
        """``run`` (complete events) as a ``PlainRun``, or None where it is not proven plain."""
        # n events, each a single line "data:{...<end>": n-1 separators, and no newline but theirs and the last two
        n = run.count(self.sep) + 1
        if (
            not run.startswith(b"data:{")
            or not run.endswith(self.last)
            or run.count(b"\n") != 2 * n
            or b'"error"' in run
        ):
            return None
        for marker in self.each:
            if run.count(marker) != n:
                return None
        return PlainRun(run, n)


class PlainRun:
    """Complete upstream SSE events, in the upstream's own bytes, proven plain: ``events`` events, one token each."""

    __slots__ = ("data", "events")

    def __init__(self, data: bytes, events: int) -> None:
        self.data = data
        self.events = events

    @property
    def tokens(self) -> int:
        return self.events

    def __repr__(self) -> str:
        return f"PlainRun(events={self.events}, data={self.data!r})"


class ParsedRun(list[Any]):
    """A ``PlainRun``'s events parsed: a list of events, each an ordinary token event (one token, no details, no
    error), so that whoever only counts them (``Gateway``'s accounting) can take the whole run at once."""

    __slots__ = ()

    @property
    def tokens(self) -> int:
        return len(self)


def parse_run(run: PlainRun) -> ParsedRun:
    """A run's events parsed, in one ``orjson`` call: its ``data:{...}`` lines made one JSON array (a run is proven
    to be such lines, each ended by a blank line). Raises ``orjson.JSONDecodeError`` where an event is not JSON."""
    data = run.data
    parsed = ParsedRun(orjson.loads(b"[" + data[5:-2].replace(_SEPARATOR, b"},{") + b"]"))
    if len(parsed) != run.events:  # a JSON string that holds a separator's bytes cannot be: its "\n" is escaped
        raise orjson.JSONDecodeError("a run's events did not parse one by one", "", 0)
    return parsed


_PEEL = 3  # odd events taken off a run's end (the last token's, usage, [DONE]) before it is split event by event
_SEPARATOR = b"}\n\ndata:{"


class EventScanner:
    """Scan SSE bytes instead of decoding them: runs of plain events come out as ``PlainRun`` (their bytes, to be
    relayed unchanged), every other event as its ``data`` payload (a ``str``, to be parsed), in stream order.

    The findings equal ``SSEDecoder``'s (``tests/test_sse_scan.py``): a run is plain only when its events are
    single ``data:{...}`` lines without ``\\r`` and ``shape`` proves them plain; a stream with a ``\\r`` anywhere is
    decoded by ``SSEDecoder`` from there on. Complete events only: a run always ends at a blank line. A handful of
    passes of ``bytes.count`` over a read, no Python object per event.
    """

    __slots__ = ("_buf", "_decoder", "_shape")

    def __init__(self, shape: PlainShape) -> None:
        self._shape = shape
        self._buf = b""
        self._decoder: SSEDecoder | None = None  # set once a \r shows up: the general decoder from then on

    def feed(self, chunk: bytes) -> list[PlainRun | str]:
        if self._decoder is not None:
            return list[PlainRun | str](self._decoder.feed(chunk))
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in chunk:
            self._decoder = SSEDecoder()
            self._buf = b""
            return list[PlainRun | str](self._decoder.feed(buf))
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return []
        end += 2
        self._buf = buf[end:]
        out: list[PlainRun | str] = []
        self._scan(buf[:end] if end < len(buf) else buf, out)
        return out

    def close(self) -> list[PlainRun | str]:
        if self._decoder is not None:
            return list[PlainRun | str](self._decoder.close())
        buf, self._buf = self._buf, b""
        if not buf:
            return []
        decoder = SSEDecoder()
        return [*decoder.feed(buf), *decoder.close()]

    def _scan(self, run: bytes, out: list[PlainRun | str]) -> None:
        """``run``: complete events (it ends with a blank line)."""
        tail: list[bytes] = []
        end = self._shape.last
        while run and len(tail) < _PEEL and not run.endswith(end):  # its last event is not plain: parse it
            cut = run.rfind(b"\n\n", 0, len(run) - 2)
            cut = 0 if cut < 0 else cut + 2
            tail.append(run[cut:])
            run = run[:cut]
        if run:
            plain = self._shape.plain(run)
            if plain is not None:
                out.append(plain)
            else:
                self._one_by_one(run, out)
        for event in reversed(tail):
            self._one(event, out)

    def _one_by_one(self, run: bytes, out: list[PlainRun | str]) -> None:
        start = 0
        while start < len(run):
            found = run.find(b"\n\n", start)
            end = len(run) if found < 0 else found + 2
            self._one(run[start:end], out)
            start = end

    def _one(self, event: bytes, out: list[PlainRun | str]) -> None:
        """One event's bytes (up to and including the blank line that ends it; no ``\\r``)."""
        plain = self._shape.plain(event)
        if plain is not None:
            out.append(plain)
            return
        decoder = SSEDecoder()
        out.extend(decoder.feed(event))
        out.extend(decoder.close())
