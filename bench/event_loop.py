"""The gateway on uvloop against asyncio's own loop: two gateways in front of one simulated TGI, the same streams
through each route of each, interleaved in rotating order, each run with the other gateway stopped (SIGSTOP) and
once the one it uses is quiet. Prints per level and route the medians over rounds of p50, p99, tokens/s and the
gateway's CPU per request (its processes in /proc; 10 ms ticks over a run's requests).

    python -m bench.event_loop [--levels 1,16] [--rounds 7]

Ends with ``RESULT cpu_ratio_tgi=… cpu_ratio_openai=… cpu_ratio_grpc=… tokens_ratio_c16=…``: uvloop's CPU per
request over asyncio's at the highest level (summed over rounds), per route, and uvloop's tokens/s over asyncio's
there, the worst route.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import aiohttp
import grpc

from bench._cpu import cpu_s, tree
from bench._procs import sim_process
from bench.proxy_overhead import (
    One,
    Run,
    drive,
    grpc_route,
    joulegate,
    only_running,
    openai_route,
    settle,
    tgi_route,
)
from proxy.pb.fmaas import generation_pb2_grpc as pbg

LOOPS = ("asyncio", "uvloop")
ROUTES = ("tgi", "openai", "grpc")


async def measure(gateways: dict[str, tuple[str, int, int]], levels: list[int], rounds: int) -> dict:
    """level -> (loop, route) -> (runs, CPU seconds, requests)."""
    out: dict[int, dict[tuple[str, str], tuple[list[Run], float, int]]] = {}
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    async with aiohttp.ClientSession(connector=connector) as http, contextlib.AsyncExitStack() as es:
        routes: dict[tuple[str, str], One] = {}
        for loop, (url, grpc_port, _pid) in gateways.items():
            channel = await es.enter_async_context(grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}"))
            routes[(loop, "tgi")] = tgi_route(http, url, 64)
            routes[(loop, "openai")] = openai_route(http, url, 64, "tgi")
            routes[(loop, "grpc")] = grpc_route(pbg.GenerationServiceStub(channel), 64)
        with only_running({loop: g[2] for loop, g in gateways.items()}) as run_only:
            for (loop, _), one in routes.items():  # warm-up
                run_only(loop)
                await drive(4, 8, one)
            keys = list(routes)
            for c in levels:
                n = max(200, 3 * c)
                runs: dict[tuple[str, str], list[Run]] = defaultdict(list)
                cpu: dict[tuple[str, str], float] = defaultdict(float)
                for r in range(rounds):
                    for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
                        run_only(key[0])
                        await settle()
                        pids = tree(gateways[key[0]][2])
                        before = cpu_s(pids)
                        runs[key].append(await drive(c, n, routes[key]))
                        cpu[key] += cpu_s(pids) - before
                out[c] = {k: (runs[k], cpu[k], n * rounds) for k in keys}
                print(f"--- {c} stream(s), {n} requests a run, {rounds} rounds (medians; CPU summed)", flush=True)
                for (loop, route), (rs, cpu_total, requests) in out[c].items():
                    print(
                        f"  {loop:8s} {route:7s} p50 {statistics.median(x.pct(0.5) for x in rs):7.2f} "
                        f"p99 {statistics.median(x.pct(0.99) for x in rs):7.2f} ms "
                        f"{statistics.median(x.tokens_per_s for x in rs):8.0f} tok/s "
                        f"{cpu_total * 1e6 / requests:6.0f} us CPU/request",
                        flush=True,
                    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,16")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.ExitStack() as es,
    ):
        sim = es.enter_context(sim_process("--time-scale", "0", "--max-concurrent-requests", "1024"))
        gateways: dict[str, tuple[str, int, int]] = {}
        for loop in LOOPS:
            workdir = Path(tmp) / loop
            workdir.mkdir()
            gateways[loop] = es.enter_context(joulegate(workdir, sim, {"JOULEGATE_SERVER__EVENT_LOOP": loop}))
        out = asyncio.run(measure(gateways, levels, args.rounds))
    top = out[max(levels)]
    cpu_ratio = {r: top[("uvloop", r)][1] / top[("asyncio", r)][1] for r in ROUTES}
    tps = {k: statistics.median(x.tokens_per_s for x in v[0]) for k, v in top.items()}
    tokens_ratio = min(tps[("uvloop", r)] / tps[("asyncio", r)] for r in ROUTES)
    print(
        "RESULT " + " ".join(f"cpu_ratio_{r}={v:.2f}" for r, v in cpu_ratio.items())
        + f" tokens_ratio_c{max(levels)}={tokens_ratio:.2f}"
    )  # fmt: skip


if __name__ == "__main__":
    main()
