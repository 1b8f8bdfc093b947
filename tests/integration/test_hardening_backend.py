"""One tenant's broken stream must not take a backend out of service for everybody.

Finding: a lone surrogate crashed the simulator mid-response; the gateway took the broken stream for a dead backend
and marked it unreachable until the next health check, so another tenant failed 56 % of its calls. Here the stream
is broken on purpose by a small HTTP proxy in front of the simulator: it forwards every call to the real simulator,
except a prompt containing ``POISON``, whose stream it cuts after the first event (a real TCP abort) — a backend
whose handler crashed on one request. ``dead`` makes the proxy's /health fail too: a backend that is really gone.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from aiohttp import web
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proxy.pb.fmaas import generation_pb2 as pb
from sim.config import SimConfig
from sim.server import SimTGI
from tests.waiting import wait_until_async

from .harness import Stack, running_stack

FIRST_EVENT = b'data:{"index":1,"token":{"id":5,"text":"a","logprob":-1.0,"special":false},"generated_text":null}\n\n'


class BreakingProxy:
    """Forwards to the simulator; cuts POISON streams after their first event; fails /health when ``dead``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.dead = False
        self.health_checks = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._forward)
        app.router.add_post("/tokenize", self._forward)
        app.router.add_post("/generate_stream", self._stream)
        self._session = aiohttp.ClientSession(self.upstream)
        self._runner = web.AppRunner(app, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.health_checks += 1
        return web.Response(status=503 if self.dead else 200)

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        async with self._session.request(request.method, request.path, data=await request.read(),
                                         headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
            return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if b"POISON" in body:
            await response.write(FIRST_EVENT)
            assert request.transport is not None
            request.transport.abort()  # the backend's handler crashed on this request: a broken connection
            return response
        async with self._session.post(
            "/generate_stream", data=body, headers={"Content-Type": "application/json"}
        ) as up:
            async for chunk in up.content.iter_any():
                await response.write(chunk)
        return response


@pytest.fixture
async def stack(tmp_path) -> AsyncIterator[tuple[Stack, BreakingProxy]]:  # type: ignore[no-untyped-def]
    sim = SimTGI(SimConfig(time_scale=0.0))
    proxy = BreakingProxy(await sim.start())
    url = await proxy.start()
    try:
        # health checks every 30 s: whatever takes the backend out during a test is the gateway's own doing
        async with running_stack(
            tmp_path, model={"backends": [{"url": url}]}, overrides={"backend_pool": {"health_interval_s": 30}}
        ) as s:
            yield s, proxy
    finally:
        await proxy.stop()
        await sim.stop()


def _request(text: str) -> pb.BatchedGenerationRequest:
    return pb.BatchedGenerationRequest(
        requests=[pb.GenerationRequest(text=text)], params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=3))
    )


async def _generate(s: Stack, text: str) -> grpc.StatusCode:
    try:
        await s.stub.Generate(_request(text), metadata=s.auth, timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_broken_stream_does_not_take_the_backend_out_for_everybody(
    stack: tuple[Stack, BreakingProxy],
) -> None:
    s, _ = stack
    pool = s.app.pools["sim-model"]
    assert await _generate(s, "POISON please") == grpc.StatusCode.UNAVAILABLE  # that one stream broke
    assert pool.healthy
    # the other tenant's calls right after it, and alongside more poison
    others = [_generate(s, f"an honest prompt {i}") for i in range(20)]
    poison = [_generate(s, "POISON again") for _ in range(5)]
    codes = await asyncio.gather(*others, *poison)
    assert codes[:20] == [grpc.StatusCode.OK] * 20
    assert set(codes[20:]) == {grpc.StatusCode.UNAVAILABLE}
    assert pool.healthy


async def test_a_broken_stream_from_a_backend_that_is_really_gone_takes_it_out_at_once(
    stack: tuple[Stack, BreakingProxy],
) -> None:
    """The suspicion is checked with a /health probe right away, not at the next periodic check (30 s away)."""
    s, proxy = stack
    health = health_pb2_grpc.HealthStub(s.channel)
    checks_before = proxy.health_checks
    proxy.dead = True
    assert await _generate(s, "POISON") == grpc.StatusCode.UNAVAILABLE
    pool = s.app.pools["sim-model"]
    await wait_until_async(lambda: not pool.healthy, 10.0, what="the probe to take the dead backend out")
    assert proxy.health_checks > checks_before

    async def not_serving() -> bool:
        status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
        return status == health_pb2.HealthCheckResponse.NOT_SERVING

    await wait_until_async(not_serving, 10.0, what="gRPC health NOT_SERVING")
    assert await _generate(s, "an honest prompt") == grpc.StatusCode.UNAVAILABLE
