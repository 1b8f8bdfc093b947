"""A stream's read timeout (``request_timeout_s``, no byte for that long) without one timer per read: the lazy
watch fires as aiohttp's ``sock_read`` would, with aiohttp's exception, and goes away with the response."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from proxy.backends import _ReadWatch


async def _server(stall_after: int) -> tuple[web.AppRunner, str]:
    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(stall_after):
            await resp.write(b"data:{}\n\n")
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        return resp

    app = web.Application()
    app.router.add_post("/s", stream)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def test_a_stalled_stream_times_out_after_the_last_byte_not_the_first() -> None:
    runner, url = await _server(stall_after=5)  # bytes for 0.5 s, then nothing
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(url + "/s", timeout=aiohttp.ClientTimeout(sock_read=0.4))
            _ReadWatch.attach(resp, 0.4)
            t0 = time.monotonic()
            with pytest.raises(aiohttp.SocketTimeoutError):
                async for _ in resp.content.iter_any():
                    pass
            waited = time.monotonic() - t0
            resp.close()
        assert 0.4 + 0.4 <= waited < 0.5 + 0.4 * 9 / 8 + 0.3  # from the last byte (at ~0.4-0.5 s), not the first
    finally:
        await runner.cleanup()


async def test_the_watch_ends_with_the_response() -> None:
    runner, url = await _server(stall_after=1)
    try:
        async with aiohttp.ClientSession() as http:
            resp = await http.post(url + "/s")
            _ReadWatch.attach(resp, 0.2)
            conn = resp.connection
            assert conn is not None
            (watch,) = [cb.__self__ for cb in conn._callbacks if isinstance(getattr(cb, "__self__", None), _ReadWatch)]
            assert watch._handle is not None
            resp.close()
            assert watch._handle is None
    finally:
        await runner.cleanup()
