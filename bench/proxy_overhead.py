"""What the gateway adds: the same streaming workload straight to the simulated TGI and through joulegate.

The simulator runs with ``--time-scale 0`` (every step instantaneous), so what remains is transport and the
gateway's own work. At each concurrency level the same requests go (1) straight to the simulator over HTTP
(``/generate_stream``, SSE) and (2) through the gateway over gRPC (``GenerateStream``), one after the other in the
same run. The simulator, the gateway and this load generator are three processes on the same machine.

Prints a table per level, then ``RESULT added_p50_ms=… added_p99_ms=… proxy_tokens_per_s=… direct_tokens_per_s=…``:
added latency per request at a single stream (what one client feels), and the best streamed tokens/s over all
levels (what one gateway process can carry).

    python -m bench.proxy_overhead [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

from bench._procs import gateway_process, sim_process
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg

PROMPT = "Explain in one paragraph why batching requests saves energy on a GPU serving a language model."


@dataclass
class Run:
    latencies_ms: list[float]
    tokens: int
    wall_s: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(q * len(xs)))]


async def _drive(concurrency: int, requests: int, one) -> Run:
    lat: list[float] = []
    tokens = 0
    todo = iter(range(requests))

    async def worker() -> None:
        nonlocal tokens
        for _ in todo:
            t0 = time.perf_counter()
            n = await one()  # not `tokens += await one()`: that reads `tokens` before the await
            lat.append((time.perf_counter() - t0) * 1000)
            tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Run(lat, tokens, time.perf_counter() - t0)


async def direct(url: str, concurrency: int, requests: int, new_tokens: int) -> Run:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "details": True}}
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as http:

        async def one() -> int:
            n = 0
            async with http.post("/generate_stream", json=body) as resp:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        n += 1
            return n

        await _drive(min(concurrency, 8), min(requests, 16), one)  # warm-up
        return await _drive(concurrency, requests, one)


async def proxied(port: int, concurrency: int, requests: int, new_tokens: int) -> Run:
    req = pb.SingleGenerationRequest(
        request=pb.GenerationRequest(text=PROMPT),
        params=pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=new_tokens)),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.GenerationServiceStub(ch)

        async def one() -> int:
            n = 0
            async for msg in stub.GenerateStream(req):
                n = msg.generated_token_count  # cumulative: one message may carry several tokens
            return n

        await _drive(min(concurrency, 8), min(requests, 16), one)  # warm-up
        return await _drive(concurrency, requests, one)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests per level (under a minute)")
    ap.add_argument("--levels", default="1,4,16,64,256")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    per_level = 120 if args.quick else 600

    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        sim_process("--time-scale", "0", "--max-concurrent-requests", "1024") as url,
        gateway_process(Path(tmp), [url], env={"JOULEGATE_BACKEND_POOL__MAX_CONCURRENT_REQUESTS": "1024"}) as (
            port,
            _proc,
        ),
    ):
        for c in levels:
            n = max(per_level, 2 * c)
            d = asyncio.run(direct(url, c, n, args.new_tokens))
            p = asyncio.run(proxied(port, c, n, args.new_tokens))
            rows.append((c, d, p))
            print(
                f"streams={c:4d}  direct p50={d.pct(0.5):7.2f} ms p99={d.pct(0.99):7.2f} ms {d.tokens_per_s:9.0f} tok/s"
                f" | gateway p50={p.pct(0.5):7.2f} ms p99={p.pct(0.99):7.2f} ms {p.tokens_per_s:9.0f} tok/s"
                f" | added p50={p.pct(0.5) - d.pct(0.5):6.2f} ms p99={p.pct(0.99) - d.pct(0.99):6.2f} ms"
                f" | throughput ratio {p.tokens_per_s / d.tokens_per_s:5.2f}",
                flush=True,
            )
    single = next(r for r in rows if r[0] == min(levels))
    added_p50 = single[2].pct(0.5) - single[1].pct(0.5)
    added_p99 = single[2].pct(0.99) - single[1].pct(0.99)
    proxy_tps = max(r[2].tokens_per_s for r in rows)
    direct_tps = max(r[1].tokens_per_s for r in rows)
    print(
        f"median added latency over all levels: {statistics.median(r[2].pct(0.5) - r[1].pct(0.5) for r in rows):.2f} ms"
    )
    print(
        f"RESULT added_p50_ms={added_p50:.2f} added_p99_ms={added_p99:.2f} "
        f"proxy_tokens_per_s={proxy_tps:.0f} direct_tokens_per_s={direct_tps:.0f}"
    )


if __name__ == "__main__":
    main()
