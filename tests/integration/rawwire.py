"""Bytes no client library would send, over real sockets: raw HTTP/1.1 requests and raw gRPC calls over HTTP/2.

``http_raw`` writes a request byte for byte (header values that are not UTF-8, bad framing, any method) and reads
the answer up to the end of the connection (requests say ``Connection: close``). ``grpc_raw`` speaks HTTP/2 through
the ``h2`` state machine with its header validation off, so metadata values can be any bytes, and returns the
``grpc-status`` and ``grpc-message`` trailers; ``h2_garbage`` sends the connection preface and then whatever bytes
the caller likes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class HttpAnswer:
    status: int | None  # None: the connection closed (or timed out) before a status line
    headers: dict[str, str]
    body: bytes
    seconds: float  # from the first byte sent to the end of the connection


def request_bytes(
    method: bytes, path: bytes, headers: list[tuple[bytes, bytes]], body: bytes = b"", *, length: bool = True
) -> bytes:
    """A complete HTTP/1.1 request (``Connection: close``, and ``Content-Length`` unless ``length`` is False)."""
    head = b"%s %s HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n" % (method, path)
    head += b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    if length:
        head += b"Content-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def parse_answer(raw: bytes, seconds: float) -> HttpAnswer:
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not sep or not lines[0].startswith(b"HTTP/"):
        return HttpAnswer(None, {}, raw, seconds)
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    return HttpAnswer(status, headers, body, seconds)


def http_raw(
    port: int, data: bytes | list[tuple[float, bytes]], *, timeout_s: float = 30.0, half_close: bool = False
) -> HttpAnswer:
    """Send ``data`` (or ``(delay_s, chunk)`` pieces, each after its delay) and read until the server closes.

    ``half_close``: shut the sending side once everything is sent (for bytes that may not end a request: the server
    sees the end of the stream instead of waiting for more).
    """
    pieces = [(0.0, data)] if isinstance(data, bytes) else data
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            for delay_s, chunk in pieces:
                if delay_s:
                    time.sleep(delay_s)
                sock.sendall(chunk)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server closed on us mid-request: read what it said
            pass
        out = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                out += chunk
    return parse_answer(out, time.monotonic() - started)


@dataclass
class GrpcAnswer:
    status: int | None  # grpc-status; None if the call never got one (connection closed, stream reset)
    message: str
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    ended_by: str = ""  # the h2 event that ended the call


def _h2() -> h2.connection.H2Connection:
    config = h2.config.H2Configuration(
        client_side=True,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        header_encoding=None,
    )
    return h2.connection.H2Connection(config=config)


def grpc_raw(
    port: int,
    path: str,
    message: bytes,
    metadata: list[tuple[bytes, bytes]],
    *,
    frame: bytes | None = None,
    timeout_s: float = 30.0,
) -> GrpcAnswer:
    """One unary-style gRPC call; ``frame`` replaces the length-prefixed message bytes when given."""
    conn = _h2()
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path.encode()),
        (b":authority", b"gateway"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
    conn.send_headers(sid, headers)
    conn.send_data(sid, frame if frame is not None else b"\x00" + struct.pack(">I", len(message)) + message)
    conn.end_stream(sid)
    answer = GrpcAnswer(status=None, message="")
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(conn.data_to_send())
        while not answer.ended_by:
            try:
                data = sock.recv(65536)
            except OSError:
                answer.ended_by = "socket error"
                break
            if not data:
                answer.ended_by = "connection closed"
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    answer.headers.update(dict(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    answer.data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded | h2.events.StreamReset | h2.events.ConnectionTerminated):
                    answer.ended_by = type(event).__name__
            sock.sendall(conn.data_to_send())
    if b"grpc-status" in answer.headers:
        answer.status = int(answer.headers[b"grpc-status"])
        answer.message = answer.headers.get(b"grpc-message", b"").decode("utf-8", "replace")
    return answer


def h2_garbage(port: int, payload: bytes, *, timeout_s: float = 10.0) -> bytes:
    """The HTTP/2 preface and a SETTINGS frame, then ``payload``; returns what the server sent until it closed."""
    conn = _h2()
    conn.initiate_connection()
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        try:
            sock.sendall(conn.data_to_send() + payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            return out
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                out += chunk
    return out
