"""A stream held by a shaping policy gets its headers early and SSE keep-alives until its first token."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import sqlalchemy as sa

from meter.store.models import Request as RequestRow
from proxy.http import streaming
from sim.config import SimConfig

from .harness import running_stack

HELD = {"shaping": {"classes": {"default": {"policy": "batch", "max_batch": 8, "hold_ms": 1200}}}}


@pytest.fixture(autouse=True)
def quick_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "HEADERS_AFTER_S", 0.2)
    monkeypatch.setattr(streaming, "KEEPALIVE_S", 0.1)


async def test_held_stream_gets_headers_then_keepalives_then_tokens(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=0.0), model=HELD, http=True) as s:
        body = {"inputs": "hold me", "parameters": {"max_new_tokens": 4}}
        async with aiohttp.ClientSession() as http:
            t0 = time.monotonic()
            async with http.post(
                f"{s.http_url}/generate_stream", json=body, headers={"authorization": f"Bearer {s.key}"}
            ) as resp:
                headers_after_s = time.monotonic() - t0
                assert resp.status == 200 and resp.headers["x-request-id"]
                raw = await resp.read()
        assert headers_after_s < 1.0  # long before the 1.2 s hold releases the request
        head, _, rest = raw.partition(b"data:")
        assert head.count(b":\n\n") >= 3  # keep-alive comments while held
        assert rest and raw.count(b"data:") == 4


async def test_client_leaving_during_the_hold_cancels_before_the_backend_sees_it(tmp_path: Path) -> None:
    async with running_stack(tmp_path, sim_config=SimConfig(time_scale=0.0), model=HELD, http=True) as s:
        body = {"inputs": "leave early", "parameters": {"max_new_tokens": 4}}
        async with aiohttp.ClientSession() as http:
            resp = await http.post(
                f"{s.http_url}/generate_stream", json=body, headers={"authorization": f"Bearer {s.key}"}
            )
            assert resp.status == 200
            await resp.content.readuntil(b":\n\n")  # held, kept alive
            resp.close()  # the client goes away while the request is still held
        await asyncio.sleep(1.5)  # past the hold: a request still queued would have been released by now
        assert s.sims[0].truth().requests == {}  # the backend never saw it
        assert await asyncio.to_thread(s.app.ledger.flush, 10.0)
        engine = sa.create_engine(s.db_url)
        with engine.connect() as conn:
            rows = list(conn.execute(sa.select(RequestRow.status, RequestRow.released_ns)))
        engine.dispose()
        assert rows == [("CANCELLED", None)]
