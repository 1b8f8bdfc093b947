"""Listening sockets, bound once the same way by every server of joulegate (the HTTP front door, the simulated TGI,
the GPU reference backend): IPv4 or IPv6 by the host's form, ``SO_REUSEADDR``, non-blocking, port 0 for any free
port.

A process that shares its ports with sibling processes (a worker of ``joulegate serve --workers N``) calls
``share_ports()`` once before it binds: every socket it binds from then on also sets ``SO_REUSEPORT``, so that the
kernel spreads the connections over the processes listening on the port."""

from __future__ import annotations

import socket

_share_ports = False


def share_ports(enabled: bool = True) -> None:
    """From now on, ``bind_tcp`` sets ``SO_REUSEPORT`` in this process (for the workers of one host)."""
    global _share_ports
    if enabled and not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("this platform has no SO_REUSEPORT: run one worker")
    _share_ports = enabled


def ports_shared() -> bool:
    return _share_ports


def bind_tcp(host: str, port: int, *, reuse_port: bool | None = None) -> socket.socket:
    """A bound, non-blocking TCP socket on ``host:port`` (``host`` with a ``:`` is IPv6); OSError when it cannot
    bind (the socket is closed then). ``reuse_port`` (default: whether ``share_ports()`` was called) sets
    ``SO_REUSEPORT``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if _share_ports if reuse_port is None else reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
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
