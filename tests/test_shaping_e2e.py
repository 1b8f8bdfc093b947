"""Shaping end to end: a real gRPC client -> GatewayApp (loopback) -> the simulated TGI server.

The simulator counts its prefill steps and files every request it sees under the gateway's x-request-id, so these
tests see from the backend's side what the shaper did: a batch class's concurrent requests share one prefill, and a
request whose deadline falls inside the hold never reaches the backend at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from app.config import load_config
from app.server import GatewayApp
from proxy.metrics import REGISTRY
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pb_grpc
from sim.config import SimConfig
from sim.server import SimTGI
from tests.waiting import wait_until_async

MODEL = "sim-model"

SHAPING = {
    "default_class": "interactive",
    "max_queued_requests": 12,
    "classes": {
        "interactive": {"policy": "passthrough", "priority": 10},
        "batch": {"policy": "batch", "max_batch": 8, "hold_ms": 3000},
        "slow": {"policy": "window", "window_ms": 60_000},
    },
}


class Stack:
    def __init__(self, sim: SimTGI, app: GatewayApp, stub: pb_grpc.GenerationServiceStub, db_url: str) -> None:
        self.sim, self.app, self.stub, self.db_url = sim, app, stub, db_url
        self.stopped = False

    def generate(self, text: str, cls: str | None = None, timeout_s: float | None = 10.0) -> Any:
        md = (("x-traffic-class", cls),) if cls else ()
        req = pb.BatchedGenerationRequest(
            model_id=MODEL,
            requests=[pb.GenerationRequest(text=text)],
            params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=4)),
        )
        return self.stub.Generate(req, metadata=md, timeout=timeout_s)

    def rows(self) -> dict[str, sa.Row[Any]]:
        engine = sa.create_engine(self.db_url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(sa.text("SELECT request_id, released_ns, status, backend FROM requests")).all()
        finally:
            engine.dispose()
        return {r.request_id: r for r in rows}


@asynccontextmanager
async def stack(tmp_path: Path, shaping: dict[str, Any]) -> AsyncIterator[Stack]:
    sim = SimTGI(SimConfig(model_id=MODEL))
    url = await sim.start()
    db_url = f"sqlite:///{tmp_path / 'gw.db'}"
    cfg = load_config(
        environ={},
        overrides={
            "db": {"url": db_url},
            "meter": {"journal_path": str(tmp_path / "journal.jsonl")},
            "server": {"grpc_listen": "127.0.0.1:0", "http_listen": ""},
            "auth": {"required": False},
            "models": [{"model_id": MODEL, "backends": [{"url": url}], "shaping": shaping}],
        },
    )
    app = GatewayApp(cfg)
    await app.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}")
    st = Stack(sim, app, pb_grpc.GenerationServiceStub(channel), db_url)
    try:
        yield st
    finally:
        await channel.close()
        if not st.stopped:
            await app.stop(2)
        await sim.stop()


async def staggered(n: int, gap_s: float, call: Callable[[int], Awaitable[Any]]) -> list[Any]:
    async def one(i: int) -> Any:
        await asyncio.sleep(gap_s * i)
        return await call(i)

    return await asyncio.gather(*(one(i) for i in range(n)))


def _release_sizes() -> tuple[float, float]:
    """(decisions, requests they released) of the batch class so far: the shaper's own record of its releases."""
    labels = {"model": MODEL, "traffic_class": "batch"}
    count = REGISTRY.get_sample_value("joulegate_shaping_release_size_requests_count", labels) or 0.0
    total = REGISTRY.get_sample_value("joulegate_shaping_release_size_requests_sum", labels) or 0.0
    return count, total


async def request_id_of(call: Any) -> str:
    return dict(await call.initial_metadata())["x-request-id"]


async def test_batch_class_releases_concurrent_requests_together(tmp_path: Path) -> None:
    async with stack(tmp_path, SHAPING) as s:
        ids: list[str] = []

        async def batch_call(i: int) -> Any:
            call = s.generate(f"prompt number {i} " * 8, cls="batch")
            ids.append(await request_id_of(call))
            return await call

        t0 = time.monotonic()
        before = s.sim.scheduler.prefill_steps
        decisions = _release_sizes()
        replies = await staggered(8, 0.03, batch_call)
        decisions = tuple(now - then for now, then in zip(_release_sizes(), decisions, strict=True))
        elapsed_s = time.monotonic() - t0
        batch_prefills = s.sim.scheduler.prefill_steps - before
        assert all(r.responses[0].generated_token_count == 4 for r in replies)
        assert elapsed_s < 1.5  # released by count (8), not by the 3 s hold

        before = s.sim.scheduler.prefill_steps
        await staggered(8, 0.03, lambda i: s.generate(f"prompt number {i} " * 8))  # interactive: passthrough
        passthrough_prefills = s.sim.scheduler.prefill_steps - before

    # Unshaped, each arrival costs TGI a prefill of its own. Released together, the eight share one or two: TGI
    # starts a prefill as soon as its queue holds a request, so the first to land (a few ms ahead of the others,
    # which come over their own connections) usually goes alone and the other seven join the next prefill.
    assert passthrough_prefills >= 6
    assert batch_prefills <= 3
    rows = s.rows()
    assert all(rows[i].status == "OK" for i in ids)
    # One decision of the policy released all eight. (Not read from released_ns: each request's own task stamps it
    # when it resumes after the decision, and a stalled loop once spread eight stamps over 0.8 s in the full run.)
    assert decisions == (1, 8)


async def test_deadline_shorter_than_the_hold_never_reaches_the_backend(tmp_path: Path) -> None:
    async with stack(tmp_path, SHAPING) as s:
        call = s.generate("a prompt that waits", cls="batch", timeout_s=0.3)
        rid = await request_id_of(call)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await call
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        ok = await s.generate("an interactive prompt", cls="interactive")  # the gateway serves on
        assert ok.responses[0].generated_token_count == 4
        assert s.app.shapers[MODEL].queued == 0
        seen = s.sim.truth().requests
        assert rid not in seen and len(seen) == 1
    row = s.rows()[rid]
    assert row.released_ns is None and row.backend is None and row.status == "DEADLINE_EXCEEDED"


async def test_unknown_class_and_full_queue_answer_with_grpc_codes(tmp_path: Path) -> None:
    async with stack(tmp_path, SHAPING) as s:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await s.generate("hello", cls="bulk")
        assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "x-traffic-class: unknown class 'bulk' (known: interactive, batch, slow)" in exc.value.details()

        held = [s.generate(f"held {i}", cls="slow", timeout_s=30) for i in range(12)]
        await wait_until_async(lambda: s.app.shapers[MODEL].queued == 12, 5.0)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await s.generate("one too many", cls="slow")
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(exc.value)
        assert status is not None and "max_queued_requests = 12" in status.message
        retry = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(retry)
        assert 0.1 <= retry.retry_delay.ToTimedelta().total_seconds() <= 30
        for call in held:
            call.cancel()
        await wait_until_async(lambda: s.app.shapers[MODEL].queued == 0, 5.0, what="cancelled calls to leave the queue")
        assert s.sim.truth().requests == {}


async def test_stop_drains_held_requests_to_the_backend(tmp_path: Path) -> None:
    async with stack(tmp_path, SHAPING) as s:
        calls = [s.generate(f"held {i}", cls="slow", timeout_s=30) for i in range(3)]
        await wait_until_async(lambda: s.app.shapers[MODEL].queued == 3, 5.0)
        stopping = asyncio.create_task(s.app.stop(5))  # the window is 60 s: only the drain releases them
        replies = await asyncio.wait_for(asyncio.gather(*calls), 5)
        await stopping
        s.stopped = True
        assert all(r.responses[0].generated_token_count == 4 for r in replies)
        ids = [await request_id_of(c) for c in calls]
        assert set(ids) == set(s.sim.truth().requests)
