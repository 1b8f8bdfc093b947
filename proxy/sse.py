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
