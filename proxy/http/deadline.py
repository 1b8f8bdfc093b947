"""A deadline on request heads, against slowloris: a client must send a whole request line and headers in time.

A connection that has not delivered a complete request head within ``timeout_s`` of opening, or of the first byte
of its next request, gets ``408 Request Timeout`` and is closed. Without it, a client trickling one header byte at a
time holds a connection (and its buffers) for as long as it likes; aiohttp itself bounds only idle keep-alive time,
and older versions not even the wait for a connection's first request.

How: every connection's protocol (aiohttp's ``RequestHandler``) is wrapped in a ``_Guard`` that forwards the asyncio
protocol calls unchanged and notes when its head is due (one server-wide sweep closes the late ones); the front
door's middleware, which runs once aiohttp has parsed a head, tells the guard ``head_arrived`` and, when the answer
is out, ``request_done``. Body bytes (after the head) never arm the deadline, so a slow upload is not cut; idle
keep-alive is aiohttp's business (``keepalive_timeout``).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable

from aiohttp import web

HEAD_TIMEOUT_S = 15.0
_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


class _State(enum.Enum):
    AWAITING_HEAD = 1  # a head is due by the guard's _due
    IN_REQUEST = 2  # the head arrived; bytes now are its body (or pipelined requests)
    IDLE = 3  # between requests on a kept-alive connection


class HeadDeadlines:
    """The guards of one HTTP server's connections, and the one timer that sweeps them.

    A guard notes when its head is due (one clock read); a sweep every ``timeout_s / 4`` (at most a second) closes
    the late ones. One timer for the server instead of a timer armed and cancelled per request: a request costs no
    timer-heap work, and a late head is cut at most a sweep's period after its deadline."""

    def __init__(self, timeout_s: float = HEAD_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s  # read at every arming: a running server may be given a new value
        self._guards: dict[asyncio.BaseTransport, _Guard] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed_late = 0  # connections closed for a late head (for tests and logs)

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that wraps ``inner``'s protocols."""
        return lambda: _Guard(inner(), self)

    def head_arrived(self, transport: asyncio.BaseTransport | None) -> None:
        guard = self._guards.get(transport) if transport is not None else None
        if guard is not None:
            guard._state = _State.IN_REQUEST

    def request_done(self, transport: asyncio.BaseTransport | None) -> None:
        """The answer is (about to be) out: the connection idles until its next request's first byte. Only once per
        request: a second call (the relay's, then the middleware's) leaves a next head's deadline armed."""
        guard = self._guards.get(transport) if transport is not None else None
        if guard is not None and guard._state is _State.IN_REQUEST:
            guard._state = _State.IDLE

    def _period_s(self) -> float:
        return min(1.0, self.timeout_s / 4)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sweep while there are connections (a guard calls this when it arms)."""
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._period_s(), self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._sweeper = None
        now = loop.time()
        for guard in [g for g in self._guards.values() if g._state is _State.AWAITING_HEAD and now >= g._due]:
            guard._expired()
        if self._guards:
            self._watch(loop)


# the application's HeadDeadlines, for a handler that ends its answer itself (proxy.http.streaming)
DEADLINES_KEY = web.AppKey("joulegate_head_deadlines", HeadDeadlines)


class _Guard(asyncio.Protocol):
    __slots__ = ("_due", "_loop", "_owner", "_state", "inner", "transport")

    def __init__(self, inner: asyncio.Protocol, owner: HeadDeadlines) -> None:
        self.inner = inner
        self._owner = owner
        self._state = _State.AWAITING_HEAD
        self._due = 0.0  # loop time by which the awaited head must be in
        self._loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.BaseTransport | None = None

    # -- the deadline ------------------------------------------------------------------------------------------------
    def _arm(self) -> None:
        """A head is awaited from now on."""
        self._state = _State.AWAITING_HEAD
        if self._loop is not None:
            self._due = self._loop.time() + self._owner.timeout_s
            self._owner._watch(self._loop)

    def _expired(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        self._owner.closed_late += 1
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(_REQUEST_TIMEOUT)
        transport.close()

    # -- asyncio.Protocol, forwarded -----------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._loop = asyncio.get_running_loop()
        self._owner._guards[transport] = self
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._state is _State.IDLE:  # the first byte of the next request: its head is due in timeout_s
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self._owner._guards.pop(self.transport, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()
