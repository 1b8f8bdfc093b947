"""Incremental Server-Sent Events decoding: bytes in, the ``data`` payload of each complete event out.

TGI streams ``data:{json}\\n\\n`` per token. Chunks from the network split events anywhere (inside a line, inside a
multi-byte character), so the decoder buffers bytes until a blank line ends an event. Lines are split on
``\\n`` with an optional ``\\r`` before it, per the SSE spec; ``event:``/``id:``/``retry:`` fields and ``:``
comments are ignored (TGI sends none that matter), multi-line data is joined with ``\\n``.
"""

from __future__ import annotations


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
    prove every event in it is an ordinary token event, which the gateway needs to count, not to read.

    ``each``: byte strings that occur exactly once in every plain event (e.g. ``"details":null``); ``tokens``: the
    byte string whose occurrences count the tokens (one per plain event for TGI, one per choice for OpenAI chunks);
    ``only_as``: (key, the only form it may take) pairs, e.g. ``usage`` only as ``"usage":null``. Any event that
    contains ``"error"`` is never plain. The checks are conservative: an event they do not prove plain is parsed.
    Key patterns with unescaped quotes can only be keys, never inside a JSON string (whose quotes are escaped).
    """

    __slots__ = ("each", "only_as", "tokens")

    def __init__(self, each: tuple[bytes, ...], tokens: bytes, only_as: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        self.each = each
        self.tokens = tokens
        self.only_as = only_as

    def tokens_of(self, run: bytes, n: int) -> int | None:
        """The tokens in ``run`` (``n`` complete, single-line ``data:{...}`` events), or None when it is not plain."""
        if b'"error"' in run:
            return None
        for marker in self.each:
            if run.count(marker) != n:
                return None
        for key, form in self.only_as:
            if run.count(key) != run.count(form):
                return None
        return run.count(self.tokens)


class PlainRun:
    """Complete upstream SSE events, in the upstream's own bytes, proven plain: ``events`` events, ``tokens`` tokens."""

    __slots__ = ("data", "events", "tokens")

    def __init__(self, data: bytes, events: int, tokens: int) -> None:
        self.data = data
        self.events = events
        self.tokens = tokens

    def __repr__(self) -> str:
        return f"PlainRun(events={self.events}, tokens={self.tokens}, data={self.data!r})"


_PEEL = 3  # events taken off a run's end (the last token's, usage, [DONE]) before it is split event by event


class EventScanner:
    """Scan SSE bytes instead of decoding them: runs of plain events come out as ``PlainRun`` (their bytes, to be
    relayed unchanged), every other event as its ``data`` payload (a ``str``, to be parsed), in stream order.

    The findings equal ``SSEDecoder``'s (``tests/test_sse_scan.py``): a run is plain only when its events are
    single ``data:{...}`` lines without ``\\r`` and ``shape`` proves them plain; a stream with a ``\\r`` anywhere is
    decoded by ``SSEDecoder`` from there on. Complete events only: a run always ends at a blank line.
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

    def _plain(self, run: bytes) -> PlainRun | None:
        n = run.count(b"\n\n")
        if (
            run.count(b"\n") != 2 * n
            or not run.startswith(b"data:{")
            or run.count(b"\ndata:{") != n - 1
            or run.count(b"}\n\n") != n
        ):
            return None
        tokens = self._shape.tokens_of(run, n)
        return None if tokens is None else PlainRun(run, n, tokens)

    def _scan(self, run: bytes, out: list[PlainRun | str]) -> None:
        """``run``: complete events (it ends with a blank line)."""
        tail: list[bytes] = []
        while run:
            plain = self._plain(run)
            if plain is not None:
                out.append(plain)
                break
            if len(tail) == _PEEL:  # not one odd event at the end: event by event
                self._one_by_one(run, out)
                break
            cut = run.rfind(b"\n\n", 0, len(run) - 2)
            cut = 0 if cut < 0 else cut + 2
            tail.append(run[cut:])
            run = run[:cut]
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
        plain = self._plain(event)
        if plain is not None:
            out.append(plain)
            return
        decoder = SSEDecoder()
        out.extend(decoder.feed(event))
        out.extend(decoder.close())
