"""Streaming POSTs to one backend over pooled HTTP/1.1 keep-alive connections: the request path's upstream client.

Why not aiohttp's client, which the gateway keeps for every other call to a backend (health, ``/info``,
``/tokenize``): on the request path it was the largest block of the gateway's own CPU that the gateway chooses. A
request object, header multidicts, a task to write the body, a stream reader fed chunk by chunk and timers re-armed
on every read cost about twice the CPU per 64-token stream of a protocol that writes the request in one write and
hands the body on as it is decoded (``bench/upstream_client.py``: 362 against 176 us at one stream, 200 against
109 us at sixteen).

What it does, and no more: ``POST`` with a JSON body and a few headers; the answer's status line and headers; its
body framed by ``Transfer-Encoding: chunked`` (``ChunkedDecoder``), ``Content-Length`` or the connection's end;
a connection goes back to the pool when its body has ended and both sides keep it alive. Anything else on the wire
(a malformed head or chunk, a head over ``MAX_HEAD_BYTES``, bytes after a body) breaks that connection and raises
``Disconnected``; nothing malformed is ever reused. A slow reader pauses the socket (``HIGH_WATER_BYTES``), so a
fast backend cannot grow the gateway's memory. ``read_timeout_s``: no byte for that long fails the response with
``ReadTimeout`` (one timer per response, waking every ``read_timeout_s / 8``, not one per read).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ssl
from collections.abc import Mapping
from typing import cast
from urllib.parse import unquote, urlsplit

MAX_HEAD_BYTES = 64 * 1024  # a response's status line and headers
MAX_SIZE_LINE_BYTES = 1024  # a chunk's size line, extensions included
HIGH_WATER_BYTES = 256 * 1024  # decoded body not yet taken by the reader: the socket pauses past this
_HEX = b"0123456789abcdefABCDEF"


class UpstreamError(Exception):
    """The backend's connection failed this call (never an answer the backend gave: those have a status)."""


class ConnectFailed(UpstreamError):
    """No connection could be opened (refused, unresolvable, timed out): nothing was sent."""


class Disconnected(UpstreamError):
    """The connection broke or spoke malformed HTTP; ``before_answer``: before any byte of the answer came."""

    def __init__(self, message: str, *, before_answer: bool = False) -> None:
        super().__init__(message)
        self.before_answer = before_answer


class ReadTimeout(UpstreamError):
    """No byte came for ``read_timeout_s``."""


class ChunkedDecoder:
    """``Transfer-Encoding: chunked`` bytes in, the body's bytes out (pure: no I/O). ``feed`` returns the body's
    pieces that ``data`` completed; ``done`` once the last chunk and its trailers are in; ``rest``: bytes after it.
    Raises ``ValueError`` naming what is malformed."""

    __slots__ = ("_buf", "_left", "done", "rest")

    _SIZE, _CRLF, _TRAILER = -1, -2, -3  # _left below 0: what is expected next; >= 0: data bytes left in a chunk

    def __init__(self) -> None:
        self._buf = b""
        self._left = self._SIZE
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> list[bytes]:
        if self.done:
            self.rest += data
            return []
        buf = self._buf + data if self._buf else data
        n = len(buf)
        pos = 0
        out: list[bytes] = []
        while pos < n:
            left = self._left
            if left > 0:  # inside a chunk's data
                take = min(left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left = left - take or self._CRLF
            elif left == self._CRLF:
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ValueError("a chunk's data is not followed by CRLF")
                pos += 2
                self._left = self._SIZE
            elif left == self._SIZE:
                eol = buf.find(b"\r\n", pos, pos + MAX_SIZE_LINE_BYTES)
                if eol < 0:
                    if n - pos >= MAX_SIZE_LINE_BYTES:
                        raise ValueError(f"a chunk size line over {MAX_SIZE_LINE_BYTES} bytes")
                    break
                size = _chunk_size(buf[pos:eol])
                pos = eol + 2
                if size == 0:
                    self._left = self._TRAILER
                    continue
                end = pos + size
                if end + 2 <= n:  # the common case: the whole chunk is here
                    if buf[end : end + 2] != b"\r\n":
                        raise ValueError("a chunk's data is not followed by CRLF")
                    out.append(buf[pos:end])
                    pos = end + 2
                else:
                    self._left = size
            else:  # trailer lines after the last chunk, up to an empty one
                eol = buf.find(b"\r\n", pos, pos + MAX_HEAD_BYTES)
                if eol < 0:
                    if n - pos >= MAX_HEAD_BYTES:
                        raise ValueError(f"a trailer line over {MAX_HEAD_BYTES} bytes")
                    break
                line_empty = eol == pos
                pos = eol + 2
                if line_empty:
                    self.done = True
                    self.rest = buf[pos:]
                    self._buf = b""
                    return out
        self._buf = buf[pos:]
        return out


def _chunk_size(line: bytes) -> int:
    digits = line.split(b";", 1)[0].strip(b" \t")
    if not digits or len(digits) > 15 or digits.strip(_HEX):
        raise ValueError(f"a chunk size that is not a hexadecimal number: {line[:40]!r}")
    return int(digits, 16)


class UpstreamResponse:
    """One answer: ``status``, ``headers`` (names lower-cased), and its body's bytes by ``async for`` (each item all
    that had arrived, decoded), or ``read(limit)``. ``close()`` before the body's end drops the connection (a
    backend drops a request whose client went away); after it, it does nothing (the connection is pooled already)."""

    __slots__ = ("_buffered", "_conn", "_done", "_exc", "_pieces", "_waiter", "headers", "status")

    def __init__(self, conn: _Conn, status: int, headers: dict[str, str]) -> None:
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        self._pieces: list[bytes] = []
        self._buffered = 0
        self._done = False
        self._exc: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- fed by the connection -----------------------------------------------------------------------------------
    def _feed(self, pieces: list[bytes]) -> None:
        self._pieces.extend(pieces)
        for piece in pieces:
            self._buffered += len(piece)
        self._wake()

    def _end(self, exc: UpstreamError | None = None) -> None:
        if self._done or self._exc is not None:
            return
        if exc is None:
            self._done = True
            self._conn = None  # back in the pool, or closed: no longer this response's
        else:
            self._exc = exc
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- read by the caller --------------------------------------------------------------------------------------
    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        while True:
            pieces = self._pieces
            if pieces:
                data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                pieces.clear()
                self._buffered = 0
                conn = self._conn
                if conn is not None and conn.paused:
                    conn.resume()
                return data
            if self._exc is not None:
                raise self._exc
            if self._done:
                raise StopAsyncIteration
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (an error answer's message): what came before a failure counts."""
        data = b""
        try:
            async for piece in self:
                data += piece
                if len(data) >= limit:
                    break
        except UpstreamError:
            pass
        return data[:limit]

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not self._done:
            conn.drop()
        self._end(Disconnected("response closed"))


class _Conn(asyncio.Protocol):
    """One keep-alive connection: idle in the pool, or carrying one request's answer."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.bytes_seen = 0  # answer bytes of the current request (the read timeout's progress)
        self._head = b""
        self._head_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._resp: UpstreamResponse | None = None
        self._chunked: ChunkedDecoder | None = None
        self._length_left: int | None = None  # Content-Length framing: bytes left; None: chunked or until close
        self._keep_alive = False
        self._watch: asyncio.TimerHandle | None = None
        self._watch_seen = 0
        self._watch_since = 0.0

    # -- a request -------------------------------------------------------------------------------------------------
    def send(self, request: bytes) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        loop = self._pool.loop
        self.bytes_seen = 0
        self._head = b""
        self._resp = None
        self._head_waiter = waiter = loop.create_future()
        self._watch_seen, self._watch_since = 0, loop.time()
        self._watch = loop.call_at(self._watch_since + self._pool.read_timeout_s / 8, self._check_progress)
        self.transport.write(request)
        return waiter

    def _check_progress(self) -> None:
        loop = self._pool.loop
        now = loop.time()
        if self.bytes_seen != self._watch_seen:
            self._watch_seen, self._watch_since = self.bytes_seen, now
        elif now - self._watch_since >= self._pool.read_timeout_s:
            self._watch = None
            self._fail(ReadTimeout(f"no byte from the backend for {self._pool.read_timeout_s:g} s"))
            return
        self._watch = loop.call_at(now + self._pool.read_timeout_s / 8, self._check_progress)

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    # -- asyncio.Protocol ------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (create_connection's); not an isinstance check: uvloop's is no asyncio.Transport subclass
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.bytes_seen += len(data)
        if self._resp is not None:
            self._body(data)
        elif self._head_waiter is not None:
            self._on_head_bytes(data)
        else:  # an idle connection the backend talks on: nothing good can come of it
            self.drop()

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool._forget(self)
        if exc is None and self._resp is not None and self._chunked is None and self._length_left is None:
            self._finish_body()  # an answer framed by the connection's end: this is its end
        else:
            why = f"{type(exc).__name__}: {exc}" if exc else "the backend closed the connection"
            self._fail(Disconnected(f"connection lost ({why})", before_answer=self.bytes_seen == 0))

    def pause_writing(self) -> None:  # a request is one small write: nothing to hold back
        pass

    def resume_writing(self) -> None:
        pass

    # -- the answer --------------------------------------------------------------------------------------------------
    def _on_head_bytes(self, data: bytes) -> None:
        head = self._head + data if self._head else data
        while True:
            end = head.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(head) > MAX_HEAD_BYTES:
                    self._fail(Disconnected(f"malformed answer: a response head over {MAX_HEAD_BYTES} bytes"))
                else:
                    self._head = head
                return
            try:
                status, headers, version_11 = _parse_head(head[:end])
            except ValueError as exc:
                self._fail(Disconnected(f"malformed answer: {exc}"))
                return
            head = head[end + 4 :]
            if 100 <= status < 200:  # an interim answer (100 Continue, 103 Early Hints): the real one follows
                continue
            break
        self._head = b""
        connection = headers.get("connection", "").lower()
        self._keep_alive = "close" not in connection if version_11 else "keep-alive" in connection
        te = headers.get("transfer-encoding")
        cl = headers.get("content-length")
        self._chunked, self._length_left = None, None
        if te is not None:
            if te.lower().rsplit(",", 1)[-1].strip() != "chunked":
                self._fail(Disconnected(f"malformed answer: unsupported transfer-encoding {te[:40]!r}"))
                return
            self._chunked = ChunkedDecoder()
            if cl is not None:
                self._keep_alive = False  # both framings: never reuse a connection that could be desynchronised
        elif status in (204, 304):
            self._length_left = 0
        elif cl is not None:
            if not cl.isdigit() or len(cl) > 18:
                self._fail(Disconnected(f"malformed answer: content-length {cl[:40]!r}"))
                return
            self._length_left = int(cl)
        else:
            self._keep_alive = False  # the body ends with the connection
        resp = self._resp = UpstreamResponse(self, status, headers)
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(resp)
        if self._length_left == 0:
            self._finish_body(head)
        elif head:
            self._body(head)

    def _body(self, data: bytes) -> None:
        resp = self._resp
        assert resp is not None
        chunked = self._chunked
        if chunked is not None:
            try:
                pieces = chunked.feed(data)
            except ValueError as exc:
                self._fail(Disconnected(f"malformed answer: {exc}"))
                return
            if pieces:
                resp._feed(pieces)
            if chunked.done:
                self._finish_body(chunked.rest)
        elif self._length_left is not None:
            take = data[: self._length_left]
            self._length_left -= len(take)
            if take:
                resp._feed([take])
            if self._length_left == 0:
                self._finish_body(data[len(take) :])
        else:
            resp._feed([data])
        if resp._buffered > HIGH_WATER_BYTES and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def _finish_body(self, rest: bytes = b"") -> None:
        resp, self._resp = self._resp, None
        self._stop_watch()
        reusable = self._keep_alive and not rest and not self.closed
        if reusable:
            self._pool._release(self)
        elif not self.closed:
            self.drop()
        if resp is not None:
            resp._end()

    def _fail(self, exc: UpstreamError) -> None:
        self._stop_watch()
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        resp, self._resp = self._resp, None
        if resp is not None:
            resp._end(exc)
        if not self.closed:
            self.drop()

    # -- control ---------------------------------------------------------------------------------------------------
    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def drop(self) -> None:
        """Close the connection now (abort: nothing of ours is left to send)."""
        self._stop_watch()
        if not self.closed:
            self.closed = True
            self._pool._forget(self)
            if self.transport is not None:
                self.transport.abort()


def _parse_head(raw: bytes) -> tuple[int, dict[str, str], bool]:
    """(status, headers with lower-cased names, HTTP/1.1 or later) of a response head without its blank line."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit() or rest[3:4] not in ("", " "):
        raise ValueError(f"a status line {lines[0][:60]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or "\n" in line or "\r" in line:
            raise ValueError(f"a header line {line[:60]!r}")
        key = name.lower()
        value = value.strip(" \t")
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return int(code), headers, version != "HTTP/1.0"


class UpstreamPool:
    """Connections to one backend (``url``: http or https, no path beyond a prefix), at most ``max_connections``
    open; idle ones are reused most recent first and closed after ``keepalive_s`` idle."""

    def __init__(
        self,
        url: str,
        *,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        keepalive_s: float = 60.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r}: an http:// or https:// URL")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        self._host_header = parts.netloc.rsplit("@", 1)[-1]
        self._auth = ""  # a URL's user:password, sent as basic auth (as aiohttp's client does)
        if parts.username is not None:
            credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._auth = f"Authorization: Basic {base64.b64encode(credentials).decode()}\r\n"
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._connecting = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def request_bytes(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        """The request as it goes on the wire. A path or header that could split it is refused (ValueError)."""
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        lines = len(headers)
        if extra.count("\n") != lines or extra.count("\r") != lines or "\x00" in extra:
            raise ValueError("a request header holds a line break or NUL")
        if not path.startswith("/") or any(c in path for c in " \t\r\n\x00"):
            raise ValueError(f"a request path {path[:60]!r}")
        head = (
            f"POST {self._prefix}{path} HTTP/1.1\r\nHost: {self._host_header}\r\n{self._auth}"
            f"Content-Length: {len(body)}\r\n{extra}\r\n"
        )
        return head.encode("latin-1") + body

    async def post(self, path: str, body: bytes, headers: Mapping[str, str]) -> UpstreamResponse:
        """Send the request and wait for the answer's head; its body is read from the response."""
        request = self.request_bytes(path, body, headers)
        conn = await self._checkout()
        waiter = conn.send(request)
        try:
            return await waiter
        except asyncio.CancelledError:
            conn.drop()
            raise

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.drop()
        self._idle.clear()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectFailed("the pool is closed"))

    # -- the pool --------------------------------------------------------------------------------------------------
    async def _checkout(self) -> _Conn:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise ConnectFailed("the pool is closed")
            now = self._loop.time()
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and now - conn.idle_since < self.keepalive_s:
                    return conn
                conn.drop()
            if len(self._open) + self._connecting < self.max_connections:
                return await self._connect()
            waiter = self._loop.create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # the turn this waiter was given passes on
                raise

    async def _connect(self) -> _Conn:
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, conn = await self.loop.create_connection(
                    lambda: _Conn(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connect timed out after {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            self._connecting -= 1
        if self._closed:
            conn.drop()
            raise ConnectFailed("the pool is closed")
        self._open.add(conn)
        return conn

    def _release(self, conn: _Conn) -> None:
        if self._closed or conn.closed:
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        self._wake_one()

    def _forget(self, conn: _Conn) -> None:
        if conn in self._open:
            self._open.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
