"""A deadline on request heads, against slowloris: a client must send a whole request line and headers in time.

A connection that has not delivered a complete request head within ``timeout_s`` of opening, or of the first byte
of its next request, gets ``408 Request Timeout`` and is closed. Without it, a client trickling one header byte at a
time holds a connection (and its buffers) for as long as it likes; aiohttp itself bounds only idle keep-alive time,
and older versions not even the wait for a connection's first request.

How: every connection's protocol (aiohttp's ``RequestHandler``) is wrapped in a ``_Guard`` that forwards the asyncio
protocol calls unchanged and keeps the timer; the front door's middleware, which runs once aiohttp has parsed a
head, tells the guard ``head_arrived`` and, when the answer is out, ``request_done``. Body bytes (after the head)
never arm the timer, so a slow upload is not cut; idle keep-alive is aiohttp's business (``keepalive_timeout``).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

from aiohttp import web

HEAD_TIMEOUT_S = 15.0
_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _State(enum.Enum):
    AWAITING_HEAD = 1  # timer armed
    IN_REQUEST = 2  # the head arrived; bytes now are its body (or pipelined requests)
    IDLE = 3  # between requests on a kept-alive connection


class HeadDeadlines:
    """The guards of one HTTP server's connections."""

    def __init__(self, timeout_s: float = HEAD_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s  # read at every arming: a running server may be given a new value
        self._guards: dict[asyncio.BaseTransport, _Guard] = {}
        self.closed_late = 0  # connections closed for a late head (for tests and logs)

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that wraps ``inner``'s protocols."""
        return lambda: _Guard(inner(), self)

    def head_arrived(self, transport: asyncio.BaseTransport | None) -> None:
        guard = self._guards.get(transport) if transport is not None else None
        if guard is not None:
            guard.set_state(_State.IN_REQUEST)

    def request_done(self, transport: asyncio.BaseTransport | None) -> None:
        """The answer is (about to be) out: the connection idles until its next request's first byte. Only once per
        request: a second call (the relay's, then the middleware's) leaves a next head's deadline armed."""
        guard = self._guards.get(transport) if transport is not None else None
        if guard is not None and guard._state is _State.IN_REQUEST:
            guard.set_state(_State.IDLE)


# the application's HeadDeadlines, for a handler that ends its answer itself (proxy.http.streaming)
DEADLINES_KEY = web.AppKey("joulegate_head_deadlines", HeadDeadlines)


class _Guard(asyncio.Protocol):
    __slots__ = ("_owner", "_state", "_timer", "inner", "transport")

    def __init__(self, inner: asyncio.Protocol, owner: HeadDeadlines) -> None:
        self.inner = inner
        self._owner = owner
        self._state = _State.AWAITING_HEAD
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.BaseTransport | None = None

    # -- the timer ---------------------------------------------------------------------------------------------------
    def set_state(self, state: _State) -> None:
        self._state = state
        if state is _State.AWAITING_HEAD:
            self._arm()
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._owner.timeout_s, self._expired)

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if self._state is not _State.AWAITING_HEAD or transport is None or transport.is_closing():
            return
        self._owner.closed_late += 1
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(_REQUEST_TIMEOUT)
        transport.close()

    # -- asyncio.Protocol, forwarded -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._owner._guards[transport] = self
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.IDLE:  # the first byte of the next request: its head is due in timeout_s
            self.set_state(_State.AWAITING_HEAD)
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self._owner._guards.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
