"""Listening sockets, bound once the same way by every server of joulegate (the HTTP front door, the simulated TGI,
the GPU reference backend): IPv4 or IPv6 by the host's form, ``SO_REUSEADDR``, non-blocking, port 0 for any free
port."""

from __future__ import annotations

import socket


def bind_tcp(host: str, port: int) -> socket.socket:
    """A bound, non-blocking TCP socket on ``host:port`` (``host`` with a ``:`` is IPv6); OSError when it cannot
    bind (the socket is closed then)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def http_url(host: str, sock: socket.socket) -> str:
    """``http://host:port`` for a socket bound on ``host`` (an IPv6 host in brackets), with the port it got."""
    port = sock.getsockname()[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
