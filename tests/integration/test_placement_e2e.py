"""Placement and drain through the real gateway: ``[routing] policy = "pack"`` keeps low load on the first backend,
an admin's drain moves new requests off a backend (tenants may not drain), and ``GET /admin/backends`` tells it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from .harness import Stack, running_stack


async def _generate(session: aiohttp.ClientSession, url: str, key: str, n: int) -> None:
    async def one(i: int) -> None:
        body = {"inputs": f"request {i} about joules", "parameters": {"max_new_tokens": 24}}
        async with session.post(url + "/generate", json=body, headers={"authorization": f"Bearer {key}"}) as r:
            assert r.status == 200, await r.text()

    await asyncio.gather(*(one(i) for i in range(n)))


def _served(stack: Stack) -> list[int]:
    return [len(sim.truth().requests) for sim in stack.sims]


async def test_pack_keeps_to_the_first_backend_and_drain_moves_new_requests_off_it(tmp_path: Path) -> None:
    routing = {"routing": {"policy": "pack", "pack_target": 4, "scale_in_after_s": 0}}
    async with running_stack(tmp_path, sims=2, overrides=routing, http=True) as stack:
        pool = stack.app.pools["sim-model"]
        first, second = (b.name for b in pool.backends)
        admin = {"authorization": f"Bearer {stack.admin_key}"}
        async with aiohttp.ClientSession() as session:
            await _generate(session, stack.http_url, stack.key, 3)  # 3 at once, below the target of 4
            assert _served(stack) == [3, 0]  # spread would have used both

            async with session.post(f"{stack.http_url}/admin/backends/{first}/drain", headers=admin) as r:
                assert r.status == 200 and (await r.json())["draining"] is True
            tenant = {"authorization": f"Bearer {stack.key}"}
            async with session.post(f"{stack.http_url}/admin/backends/{second}/drain", headers=tenant) as r:
                assert r.status == 403  # a tenant's key may not drain
            async with session.post(f"{stack.http_url}/admin/backends/nope/drain", headers=admin) as r:
                assert r.status == 404

            await _generate(session, stack.http_url, stack.key, 2)
            assert _served(stack) == [3, 2]  # new requests went to the backend that was not drained

            async with session.get(f"{stack.http_url}/admin/backends", headers=admin) as r:
                assert r.status == 200
                (model,) = (await r.json())["models"]
            assert model["policy"] == "pack" and model["backends_needed"] == 1
            assert [b["draining"] for b in model["backends"]] == [True, False]
            assert all(b["in_flight"] == 0 for b in model["backends"])

            async with session.post(f"{stack.http_url}/admin/backends/{first}/undrain", headers=admin) as r:
                assert r.status == 200 and (await r.json())["draining"] is False
            await _generate(session, stack.http_url, stack.key, 1)
            assert _served(stack) == [4, 2]  # back on the first backend in order
