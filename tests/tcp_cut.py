"""A TCP forwarder on loopback that a test can cut and restore: a real network outage between a client and a server.

``cut()`` closes the listening socket (new connections are refused: ECONNREFUSED) and resets every forwarded
connection (SO_LINGER 0, so the client sees ECONNRESET mid-query, like a dropped link or a restarted database).
``restore()`` listens on the same port again. ``stall()`` keeps every connection open but stops moving bytes (a
hung server, proxy or network: no error, just silence) until ``resume()``. Threads, no asyncio: it must keep
working while the code under test keeps the event loop or the GIL busy.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from types import TracebackType


def _reset(sock: socket.socket) -> None:
    """Abort a connection: wake any thread blocked on it (shutdown), then close with RST (linger 0)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpCut:
    def __init__(self, upstream_host: str, upstream_port: int, listen_port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = listen_port
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._flowing = threading.Event()
        self._flowing.set()
        self.accepted = 0  # connections forwarded so far
        self.cuts = 0

    # -- control ---------------------------------------------------------------------------------------------------

    def start(self) -> TcpCut:
        self._listen()
        return self

    @property
    def is_up(self) -> bool:
        return self._listener is not None

    def cut(self) -> None:
        """Refuse new connections and reset every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, set()
            self.cuts += 1
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        for c in conns:
            _reset(c)
        if self._accept_thread is not None:
            self._accept_thread.join(2)

    def restore(self) -> None:
        self._listen()

    def stall(self) -> None:
        """Stop forwarding bytes in both directions; connections stay open and new ones are accepted."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    def close(self) -> None:
        self.cut()

    def __enter__(self) -> TcpCut:
        return self.start()

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------------------------

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self.port = sock.getsockname()[1]
        with self._lock:
            self._listener = sock
        self._accept_thread = threading.Thread(target=self._accept_loop, args=(sock,), daemon=True, name="tcpcut")
        self._accept_thread.start()

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut: the listener was closed
            try:
                server = socket.create_connection(self.upstream, timeout=5)
                server.settimeout(None)
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if self._listener is not listener:  # cut while connecting
                    _reset(client)
                    _reset(server)
                    return
                self._conns.update((client, server))
                self.accepted += 1
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True, name="tcpcut-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                known = src in self._conns or dst in self._conns
                self._conns.discard(src)
                self._conns.discard(dst)
            if known:
                _reset(src)
                _reset(dst)
