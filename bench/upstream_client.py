"""The request path's upstream client against aiohttp's: the same streams from the simulated TGI, read by each in
turn (interleaved rounds, one process), CPU of this process per stream and wall time per stream.

    python -m bench.upstream_client [--streams 2000] [--rounds 5] [--concurrency 1,16]

Both clients do what the gateway does with a stream: POST a JSON body with an ``x-request-id``, check the status,
then take the body as it arrives (aiohttp: ``iter_any``; ``proxy.upstream``: ``async for``) and count its events.
The simulator runs at time scale 0 in its own process, so what differs is the client's own work. Ends with
``RESULT aiohttp_cpu_us=… upstream_cpu_us=… cpu_ratio=… aiohttp_ms=… upstream_ms=…`` (medians over rounds, at the
first concurrency level).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp
import orjson

from bench._procs import sim_process
from bench.proxy_overhead import PROMPT
from proxy.upstream import UpstreamPool

One = Callable[[int], Awaitable[int]]


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def aiohttp_client(http: aiohttp.ClientSession, body: bytes) -> One:
    async def one(i: int) -> int:
        headers = {"x-request-id": f"{i:032x}", "Content-Type": "application/json"}
        async with http.post("/generate_stream", data=body, headers=headers) as resp:
            assert resp.status == 200, resp.status
            return sum([chunk.count(b"data:") async for chunk in resp.content.iter_any()])

    return one


def upstream_client(pool: UpstreamPool, body: bytes) -> One:
    async def one(i: int) -> int:
        headers = {"x-request-id": f"{i:032x}", "Content-Type": "application/json"}
        resp = await pool.post("/generate_stream", body, headers)
        try:
            assert resp.status == 200, resp.status
            return sum([chunk.count(b"data:") async for chunk in resp])
        finally:
            resp.close()

    return one


async def run(one: One, streams: int, concurrency: int, new_tokens: int) -> tuple[float, float]:
    """(CPU us per stream, wall ms per stream)."""
    todo = iter(range(streams))

    async def worker() -> None:
        for i in todo:
            assert await one(i) == new_tokens  # an event per token (the last one with the details)

    cpu0, t0 = _cpu_s(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (_cpu_s() - cpu0) / streams * 1e6, (time.perf_counter() - t0) / streams * 1e3


async def main_async(args: argparse.Namespace, sim: str) -> None:
    body = orjson.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": args.new_tokens, "details": True}})
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(sim, connector=connector, skip_auto_headers=("User-Agent",),
                                     auto_decompress=False) as http:  # fmt: skip
        pool = UpstreamPool(sim, max_connections=1024, connect_timeout_s=2.0, read_timeout_s=60.0)
        clients = {"aiohttp": aiohttp_client(http, body), "upstream": upstream_client(pool, body)}
        try:
            for one in clients.values():  # warm-up: connections, first-call paths
                await run(one, 100, 4, args.new_tokens)
            first: dict[str, tuple[float, float]] = {}
            for c in [int(x) for x in args.concurrency.split(",")]:
                figs: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
                for r in range(args.rounds):
                    for name in list(clients)[r % 2 :] + list(clients)[: r % 2]:
                        figs[name].append(await run(clients[name], args.streams, c, args.new_tokens))
                print(f"--- {c} stream(s) at a time, {args.streams} streams a round, {args.rounds} rounds (medians)")
                for name, runs in figs.items():
                    cpu_us = statistics.median(x[0] for x in runs)
                    wall_ms = statistics.median(x[1] for x in runs)
                    print(f"  {name:9s} {cpu_us:7.0f} us CPU per stream  {wall_ms:7.3f} ms per stream")
                    first.setdefault(name, (cpu_us, wall_ms))
        finally:
            await pool.close()
    a, u = first["aiohttp"], first["upstream"]
    print(
        f"RESULT aiohttp_cpu_us={a[0]:.0f} upstream_cpu_us={u[0]:.0f} cpu_ratio={u[0] / a[0]:.2f} "
        f"aiohttp_ms={a[1]:.3f} upstream_ms={u[1]:.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    with sim_process("--time-scale", "0", "--max-concurrent-requests", "1024") as sim:
        asyncio.run(main_async(args, sim))


if __name__ == "__main__":
    main()
