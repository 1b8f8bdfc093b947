"""proxy.upstream: the request path's HTTP/1.1 client, against raw asyncio servers on loopback that send exactly the
bytes each test names (well-formed, split anywhere, malformed, stalled, cut), and a real aiohttp server."""

from __future__ import annotations

import asyncio
import base64
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.upstream import (
    HIGH_WATER_BYTES,
    ChunkedDecoder,
    ConnectFailed,
    Disconnected,
    ReadTimeout,
    UpstreamPool,
    UpstreamResponse,
)
from tests.certs import Authority


def chunked(pieces: list[bytes], trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n" + trailers + b"\r\n"


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


# -- the decoder, alone ------------------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    pieces=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=20),
    ext=st.booleans(),
    trailers=st.sampled_from([b"", b"x-trailer: 1\r\n", b"a: b\r\nc: d\r\n"]),
    after=st.binary(max_size=20),
)
def test_decoding_is_independent_of_how_the_bytes_are_split(
    pieces: list[bytes], cuts: list[int], ext: bool, trailers: bytes, after: bytes
) -> None:
    wire = chunked(pieces, trailers)
    if ext:  # chunk extensions are allowed and ignored
        wire = wire.replace(b"\r\n", b";name=value\r\n", 1) if pieces and any(pieces) else wire
    decoder = ChunkedDecoder()
    out = b""
    for part in split_at(wire + after, cuts):
        out += b"".join(decoder.feed(part))
    assert out == b"".join(pieces)
    assert decoder.done and decoder.rest == after


@pytest.mark.parametrize(
    "wire",
    [
        b"-5\r\nhello\r\n0\r\n\r\n",  # int() would take a sign
        b"zz\r\n",
        b"0x5\r\nhello\r\n",
        b"5\r\nhelloXX0\r\n\r\n",  # data not followed by CRLF
        b"1000000000000000\r\n",  # 16 hex digits: over any body
        b" \r\n",
        b"5" * 2000,  # a size line that never ends
    ],
)
def test_malformed_chunking_is_refused_by_name(wire: bytes) -> None:
    with pytest.raises(ValueError, match="chunk"):
        ChunkedDecoder().feed(wire)


# -- a pool against raw servers ----------------------------------------------------------------------------------------

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], "asyncio.Future[None] | object"]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")).split(b":")[1])
    return head + await reader.readexactly(length)


class RawServer:
    """Answers every request on every connection with ``answer(reader, writer)``; counts connections."""

    def __init__(self, answer: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object]) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                try:
                    self.requests.append(await _read_request(reader))
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                result = self.answer(reader, writer)
                if asyncio.iscoroutine(result):
                    await result
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            writer.close()


async def raw_pool(answer: Callable[..., object], **kwargs: float) -> AsyncIterator[tuple[UpstreamPool, RawServer]]:
    server = RawServer(answer)
    srv = await asyncio.start_server(server._serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    opts = {"max_connections": 8, "connect_timeout_s": 2.0, "read_timeout_s": 5.0, **kwargs}
    pool = UpstreamPool(f"http://127.0.0.1:{port}", **opts)  # type: ignore[arg-type]
    try:
        yield pool, server
    finally:
        await pool.close()
        srv.close()


async def body_of(resp: UpstreamResponse) -> bytes:
    return b"".join([piece async for piece in resp])


def sse_answer(events: int) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], None]:
    pieces = [b'data:{"token":{"id":%d}}\n\n' % i for i in range(events)]

    def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(chunked(pieces))

    return answer


async def test_streams_reuse_one_kept_alive_connection() -> None:
    async for pool, server in raw_pool(sse_answer(5)):
        for i in range(3):
            resp = await pool.post("/generate_stream", b'{"inputs":"hi"}', {"x-request-id": f"r{i}"})
            assert resp.status == 200 and resp.headers["content-type"] == "text/event-stream"
            assert (await body_of(resp)).count(b"data:") == 5
            resp.close()  # after the end: nothing to drop
        assert server.connections == 1 and pool.open_connections == 1
        first = server.requests[0]
        assert first.startswith(b"POST /generate_stream HTTP/1.1\r\n") and b"x-request-id: r0\r\n" in first
        assert first.endswith(b'\r\n\r\n{"inputs":"hi"}')


async def test_an_answer_split_byte_by_byte_arrives_whole() -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked([b"data:{}\n\n"] * 3)

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(len(wire)):
            writer.write(wire[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    async for pool, server in raw_pool(answer):
        for _ in range(2):
            resp = await pool.post("/s", b"{}", {})
            assert await body_of(resp) == b"data:{}\n\n" * 3
        assert server.connections == 1


@pytest.mark.parametrize(
    ("wire", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello", False),
    ],
)
async def test_content_length_bodies_and_who_keeps_the_connection(wire: bytes, reused: bool) -> None:
    async for pool, server in raw_pool(lambda _, w: w.write(wire)):
        for _ in range(2):
            resp = await pool.post("/s", b"{}", {})
            assert resp.status == 200 and await body_of(resp) == b"hello"
            await asyncio.sleep(0.05)  # a connection the answer closed is gone by then
        assert server.connections == (1 if reused else 2)


async def test_a_body_framed_by_the_connections_end() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async for pool, _ in raw_pool(answer):
        resp = await pool.post("/s", b"{}", {})
        assert await body_of(resp) == b"until the end"


@pytest.mark.parametrize(
    ("wire", "named"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", "transfer-encoding"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "content-length"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "status line"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n", "header line"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n", "response head over"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", None),  # bytes after a body: never reused
    ],
)
async def test_malformed_answers_break_the_connection_and_say_what(wire: bytes, named: str | None) -> None:
    async for pool, server in raw_pool(lambda _, w: w.write(wire)):
        if named is None:
            resp = await pool.post("/s", b"{}", {})
            assert await body_of(resp) == b"ok"
        else:
            with pytest.raises(Disconnected, match=named):
                resp = await pool.post("/s", b"{}", {})
                await body_of(resp)
        await asyncio.sleep(0.05)
        assert pool.open_connections == 0  # nothing malformed is ever reused
        assert server.connections == 1


async def test_a_stream_cut_mid_body_fails_and_is_not_an_end() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"9\r\ndata:{}\n\n\r\n")
        await writer.drain()
        writer.transport.abort()  # a TCP reset, no last chunk

    async for pool, _ in raw_pool(answer):
        resp = await pool.post("/s", b"{}", {})
        got = []
        with pytest.raises(Disconnected, match="connection lost"):
            async for piece in resp:
                got.append(piece)
        assert b"".join(got) == b"data:{}\n\n"


async def test_a_connection_closed_before_any_answer_is_before_answer() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    async for pool, _ in raw_pool(answer):
        with pytest.raises(Disconnected) as caught:
            await pool.post("/s", b"{}", {})
        assert caught.value.before_answer


async def test_a_stalled_stream_times_out_after_the_last_byte_not_the_first() -> None:
    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):  # bytes for 0.5 s, then nothing
            writer.write(b"9\r\ndata:{}\n\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)
        await asyncio.sleep(3)

    async for pool, _ in raw_pool(answer, read_timeout_s=0.4):
        resp = await pool.post("/s", b"{}", {})
        t0 = time.monotonic()
        with pytest.raises(ReadTimeout):
            async for _ in resp:
                pass
        waited = time.monotonic() - t0
        assert 0.4 + 0.4 <= waited < 0.5 + 0.4 * 9 / 8 + 0.3  # from the last byte (at ~0.4-0.5 s), not the first


async def test_closing_mid_stream_drops_the_connection_and_the_backend_sees_it() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n9\r\ndata:{}\n\n\r\n")
        await writer.drain()
        await reader.read()  # until the client goes away

    async for pool, server in raw_pool(answer):
        resp = await pool.post("/s", b"{}", {})
        assert await anext(resp) == b"data:{}\n\n"
        resp.close()
        await asyncio.wait_for(server.closed.wait(), 2)
        assert pool.open_connections == 0
        with pytest.raises(Disconnected):
            await anext(resp)


async def test_a_slow_reader_pauses_the_socket_instead_of_buffering_the_backend() -> None:
    piece = b"x" * 65536
    sent = 0

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(400):  # 26 MB, as fast as the socket takes it
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            sent += len(piece)
        writer.write(b"0\r\n\r\n")

    async for pool, _ in raw_pool(answer):
        resp = await pool.post("/s", b"{}", {})
        await asyncio.sleep(0.5)  # the reader does not read
        assert resp._buffered < HIGH_WATER_BYTES + 2 * len(piece)
        assert sent < 400 * len(piece)  # the backend is held back by TCP, not buffered by us
        total = 0
        async for data in resp:
            total += len(data)
        assert total == 400 * len(piece)


async def test_at_most_max_connections_and_a_waiter_gets_the_next_free_one() -> None:
    gate = asyncio.Event()

    async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await gate.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async for pool, server in raw_pool(answer, max_connections=1):
        first = asyncio.create_task(pool.post("/s", b"{}", {}))
        second = asyncio.create_task(pool.post("/s", b"{}", {}))
        await asyncio.sleep(0.2)
        assert not first.done() and not second.done() and server.connections == 1
        gate.set()
        for task in (first, second):
            assert await body_of(await task) == b"ok"
        assert server.connections == 1


async def test_nothing_listening_is_connect_failed() -> None:
    srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    srv.close()
    await srv.wait_closed()
    pool = UpstreamPool(f"http://127.0.0.1:{port}", max_connections=1, connect_timeout_s=1, read_timeout_s=1)
    with pytest.raises(ConnectFailed):
        await pool.post("/s", b"{}", {})
    await pool.close()


def test_a_urls_credentials_go_as_basic_auth_and_not_into_the_host_header() -> None:
    url = "http://us%40r:p%3Ass@127.0.0.1:8080/"
    pool = UpstreamPool(url, max_connections=1, connect_timeout_s=1, read_timeout_s=1)
    head = pool.request_bytes("/s", b"{}", {}).split(b"\r\n")
    assert b"Host: 127.0.0.1:8080" in head
    assert b"Authorization: Basic " + base64.b64encode(b"us@r:p:ss") in head


def test_a_header_or_path_that_would_split_the_request_is_refused() -> None:
    pool = UpstreamPool("http://127.0.0.1:1", max_connections=1, connect_timeout_s=1, read_timeout_s=1)
    for headers, path in (
        ({"x-request-id": "a\r\nx-injected: 1"}, "/s"),
        ({"x-a": "b\n"}, "/s"),
        ({"x-a\r\n": "b"}, "/s"),
        ({}, "/s HTTP/1.1\r\nx: y"),
        ({}, "s"),
    ):
        with pytest.raises(ValueError):
            pool.request_bytes(path, b"{}", headers)
    assert pool.request_bytes("/s", b"{}", {"a": "b"}).startswith(b"POST /s HTTP/1.1\r\nHost: 127.0.0.1:1\r\n")


async def test_against_aiohttps_own_server() -> None:
    """The framing a real server chooses (chunked for a stream, Content-Length for a JSON error)."""

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(10):
            await resp.write(b"data:%d\n\n" % i)
        await resp.write_eof()
        return resp

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"error": "no", "error_type": "validation"}, status=422)

    app = web.Application()
    app.router.add_post("/s", stream)
    app.router.add_post("/e", refuse)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    pool = UpstreamPool(f"http://127.0.0.1:{port}", max_connections=4, connect_timeout_s=1, read_timeout_s=5)
    try:
        for _ in range(3):
            resp = await pool.post("/s", b"{}", {"Content-Type": "application/json"})
            assert await body_of(resp) == b"".join(b"data:%d\n\n" % i for i in range(10))
            err = await pool.post("/e", b"{}", {})
            assert err.status == 422 and b'"validation"' in await err.read(1024)
        assert pool.open_connections == 1
    finally:
        await pool.close()
        await runner.cleanup()


async def test_https_backends_are_verified_against_the_systems_trust_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An https backend: the stream comes over TLS when its certificate chains to a trusted CA (SSL_CERT_FILE, as
    OpenSSL reads it), and a backend whose certificate nobody trusts is never sent the request."""
    ca = Authority(tmp_path)
    leaf = ca.issue("backend", server=True)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
    server = RawServer(sse_answer(3))
    srv = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=server_ctx)
    url = f"https://127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    try:
        untrusted = UpstreamPool(url, max_connections=1, connect_timeout_s=2, read_timeout_s=2)
        with pytest.raises(ConnectFailed, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.post("/s", b"{}", {})
        await untrusted.close()
        assert server.requests == []

        monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_path))
        pool = UpstreamPool(url, max_connections=1, connect_timeout_s=2, read_timeout_s=2)
        for _ in range(2):
            resp = await pool.post("/s", b"{}", {})
            assert (await body_of(resp)).count(b"data:") == 3
        assert server.connections == 1
        await pool.close()
    finally:
        srv.close()
