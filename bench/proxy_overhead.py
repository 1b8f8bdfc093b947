"""What the gateway adds, against the floor: the same streaming workload straight to the simulated TGI, through a
relay with no logic (``bench/relay.py``, the least a Python gateway adds), through joulegate's HTTP routes (TGI's
``/generate_stream`` and OpenAI's ``/v1/chat/completions``) and gRPC (``GenerateStream``), and — when given — through
the LiteLLM proxy, all interleaved in one run.

Two simulator modes: time scale 0 (every step instantaneous: what remains is transport and the gateways' own work)
and paced (``--time-scale 0.05``: tokens arrive spread out, every token its own read). At each concurrency level
every route runs ``--rounds`` times in rotating order. A route runs with the servers it does not use stopped
(SIGSTOP: the relay, joulegate's processes, LiteLLM's; the simulator always runs), once the servers it uses are quiet
(``settle``): a server's own background work — LiteLLM's logging and health loops, joulegate's sampler and ledger
writes — then lands only on the routes through it, not on the next route's run or the floor's. A route's figures
are medians over rounds, and its *added* latency is its p50/p99 minus the direct route's in the same round (TGI
routes against direct ``/generate_stream``, OpenAI routes against direct ``/v1/chat/completions``, gRPC against
direct ``/generate_stream``).

Ends with ``RESULT added_p50_ms=… added_p99_ms=… floor_added_p50_ms=… p50_ratio_to_floor=… p99_c16_ms=…
proxy_tokens_per_s=… tokens_ratio_to_floor=… grpc_added_p50_ms=…``: ``added_*`` is joulegate's worst HTTP route at
one stream (time scale 0), the floor is the relay's, ``p99_c16_ms`` joulegate's worst HTTP route's added p99 at 16
streams; ``tokens_ratio_to_floor``: each HTTP route's best tokens/s over levels against the relay's on the same
route, the worse of the two (``tokens_ratio_to_tgi_floor``: the worse route against the relay's TGI route, which the
line reported before: the OpenAI route is slower at the backend itself, so that compared unlike with unlike).

    python -m bench.proxy_overhead [--quick] [--litellm /path/to/venv/bin/litellm] [--keep-running]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc

from bench._cpu import cpu_s, tree
from bench._procs import free_port, gateway_process, sim_process
from proxy.pb.fmaas import generation_pb2 as pb
from proxy.pb.fmaas import generation_pb2_grpc as pbg
from sim.tokenizer import hf_tokenizer_json

PROMPT = "Explain in one paragraph why batching requests saves energy on a GPU serving a language model."
One = Callable[[], Awaitable[int]]
LITELLM_KEY = "sk-joulegate-bench"
LITELLM_MAX_STREAMS = 64


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


async def drive(concurrency: int, requests: int, one: One) -> Run:
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


def tgi_route(http: aiohttp.ClientSession, base: str, new_tokens: int) -> One:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": new_tokens, "details": True}}

    async def one() -> int:
        n = 0
        async with http.post(f"{base}/generate_stream", json=body) as resp:
            assert resp.status == 200, resp.status
            async for line in resp.content:
                n += line.startswith(b"data:")
        return n

    return one


def openai_route(
    http: aiohttp.ClientSession, base: str, new_tokens: int, model: str, headers: dict[str, str] | None = None
) -> One:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": new_tokens,
        "stream": True,
    }

    async def one() -> int:
        n = 0
        async with http.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            async for line in resp.content:
                n += line.startswith(b"data:") and not line.startswith(b"data: [DONE]")
        return n

    return one


def grpc_route(stub: pbg.GenerationServiceStub, new_tokens: int) -> One:
    """Every call a prompt of its own: the gateway caches the input counts of prompts it has sent to ``/tokenize``
    lately, and a benchmark that repeats one prompt would measure only cache hits. The gateway has the model's
    tokenizer file (``--tokenizer-file``, as a deployment would), so it counts them without ``/tokenize``."""
    params = pb.Parameters(stopping=pb.StoppingCriteria(max_new_tokens=new_tokens))
    calls = itertools.count()

    async def one() -> int:
        n = 0
        req = pb.SingleGenerationRequest(request=pb.GenerationRequest(text=f"{PROMPT} ({next(calls)})"), params=params)
        async for msg in stub.GenerateStream(req):
            n = msg.generated_token_count  # cumulative: one message may carry several tokens
        return n

    return one


def _wait_port(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


@contextlib.contextmanager
def process(cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """A server's URL and pid, once it listens."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            _wait_port(port)
            yield f"http://127.0.0.1:{port}", proc.pid
        finally:
            proc.terminate()
            proc.wait(30)


def _stack_cpu_s() -> float:
    """CPU seconds used so far by this process's descendants that are still running (the servers of the stack)."""
    return cpu_s(tree(os.getpid())[1:])


async def settle(window_s: float = 0.2, quiet_cpu: float = 0.1, most_s: float = 5.0) -> None:
    """Wait until the stack's servers are quiet (under ``quiet_cpu`` of a core over ``window_s``, at most ``most_s``):
    work a server defers past a run's last answer (LiteLLM's logging callbacks, joulegate's ledger writes) is then
    not measured as the next route's latency."""
    deadline = time.monotonic() + most_s
    before = _stack_cpu_s()
    while time.monotonic() < deadline:
        await asyncio.sleep(window_s)
        now = _stack_cpu_s()
        if now - before < quiet_cpu * window_s:
            return
        before = now


def _signal_tree(pid: int, sig: signal.Signals) -> None:
    for p in tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


@contextlib.contextmanager
def only_running(servers: dict[str, int]) -> Iterator[Callable[[str | None], None]]:
    """``run(name)``: the server ``name`` (and its children) runs, every other one of ``servers`` (name -> pid) is
    stopped; ``run(None)`` stops them all. On exit every one runs again (a stopped process would not act on
    SIGTERM)."""

    def run(name: str | None) -> None:
        for other, pid in servers.items():
            if other != name:
                _signal_tree(pid, signal.SIGSTOP)
        if name in servers:
            _signal_tree(servers[name], signal.SIGCONT)

    try:
        yield run
    finally:
        for pid in servers.values():
            _signal_tree(pid, signal.SIGCONT)


# route name -> the direct route its added latency is measured against
BASELINE = {
    "relay-tgi": "direct-tgi",
    "joulegate-tgi": "direct-tgi",
    "relay-openai": "direct-openai",
    "joulegate-openai": "direct-openai",
    "joulegate-grpc": "direct-tgi",
    "litellm-openai": "direct-openai",
}
JOULEGATE_HTTP = ("joulegate-tgi", "joulegate-openai")


def server_of(route: str) -> str | None:
    """The server a route goes through besides the simulator (``None``: the direct routes)."""
    return None if route.startswith("direct") else route.split("-")[0]


Figures = dict[int, dict[str, dict[str, float]]]


async def measure(urls: dict[str, str], grpc_port: int, levels: list[int], rounds: int, quick: bool,
                  new_tokens: int, run_only: Callable[[str | None], None]) -> Figures:  # fmt: skip
    """level -> route -> {p50, p99, tps, added_p50, added_p99} (medians over rounds)."""
    out: dict[int, dict[str, dict[str, float]]] = {}
    # below uvicorn's 5 s (LiteLLM): a connection idle past it is closed by the server, and reusing it fails
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    async with (
        aiohttp.ClientSession(connector=connector) as http,
        grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel,
    ):
        routes: dict[str, One] = {
            "direct-tgi": tgi_route(http, urls["sim"], new_tokens),
            "relay-tgi": tgi_route(http, urls["relay"], new_tokens),
            "joulegate-tgi": tgi_route(http, urls["joulegate"], new_tokens),
            "direct-openai": openai_route(http, urls["sim"], new_tokens, "tgi"),
            "relay-openai": openai_route(http, urls["relay"], new_tokens, "tgi"),
            "joulegate-openai": openai_route(http, urls["joulegate"], new_tokens, "tgi"),
            "joulegate-grpc": grpc_route(pbg.GenerationServiceStub(channel), new_tokens),
        }
        if "litellm" in urls:
            auth = {"authorization": f"Bearer {LITELLM_KEY}"}
            routes["litellm-openai"] = openai_route(http, urls["litellm"], new_tokens, "sim", auth)
        names = list(routes)
        for name, one in routes.items():  # warm-up: connections, caches, the first-call paths
            run_only(server_of(name))
            await drive(4, 8, one)
        for c in levels:
            n = max(60 if quick else 200, 3 * c)
            per: dict[str, list[Run]] = defaultdict(list)
            # LiteLLM tops out near 1k tok/s: past LITELLM_MAX_STREAMS a run takes minutes and its server drops
            # connections (Server disconnected at 256), so its row stops there
            at_c = [x for x in names if c <= LITELLM_MAX_STREAMS or not x.startswith("litellm")]
            for r in range(rounds):
                for name in at_c[r % len(at_c) :] + at_c[: r % len(at_c)]:
                    run_only(server_of(name))
                    await settle()
                    per[name].append(await drive(c, n, routes[name]))
            row: dict[str, dict[str, float]] = {}
            for name, runs in per.items():
                fig = {
                    "p50": statistics.median(x.pct(0.5) for x in runs),
                    "p99": statistics.median(x.pct(0.99) for x in runs),
                    "tps": statistics.median(x.tokens_per_s for x in runs),
                }
                if name in BASELINE:
                    base = per[BASELINE[name]]
                    fig["added_p50"] = statistics.median(
                        x.pct(0.5) - b.pct(0.5) for x, b in zip(runs, base, strict=True)
                    )
                    fig["added_p99"] = statistics.median(
                        x.pct(0.99) - b.pct(0.99) for x, b in zip(runs, base, strict=True)
                    )
                row[name] = fig
            out[c] = row
            print(f"--- {c} stream(s), {n} requests a run, {rounds} rounds (medians)", flush=True)
            for name, fig in row.items():
                added = (
                    f"added p50 {fig['added_p50']:6.2f} p99 {fig['added_p99']:7.2f} ms" if "added_p50" in fig else ""
                )
                print(f"  {name:17s} p50 {fig['p50']:7.2f} p99 {fig['p99']:7.2f} ms {fig['tps']:9.0f} tok/s  {added}")
    return out


@contextlib.contextmanager
def joulegate(workdir: Path, sim: str, env: dict[str, str] | None = None) -> Iterator[tuple[str, int, int]]:
    """joulegate in front of the simulator ``sim`` as the benches run it (HTTP on, the simulator's tokenizer as a
    deployment names its model's, room for every stream): its HTTP URL, gRPC port and pid."""
    http_port = free_port()
    tokenizer = workdir / "tokenizer.json"
    tokenizer.write_text(hf_tokenizer_json())
    with gateway_process(
        workdir,
        [sim],
        env={"JOULEGATE_BACKEND_POOL__MAX_CONCURRENT_REQUESTS": "1024", **(env or {})},
        args=("--http-listen", f"127.0.0.1:{http_port}", "--tokenizer-file", str(tokenizer)),
    ) as (grpc_port, proc):
        yield f"http://127.0.0.1:{http_port}", grpc_port, proc.pid


@contextlib.contextmanager
def stack(workdir: Path, time_scale: str, litellm: str | None) -> Iterator[tuple[dict[str, str], int, dict[str, int]]]:
    """The servers: their URLs, joulegate's gRPC port, and the pid of each server besides the simulator."""
    with contextlib.ExitStack() as es:
        sim = es.enter_context(sim_process("--time-scale", time_scale, "--max-concurrent-requests", "1024"))
        relay_port = free_port()
        relay_cmd = [sys.executable, "-m", "bench.relay", "--port", str(relay_port), "--upstream", sim]
        relay, relay_pid = es.enter_context(process(relay_cmd, relay_port, workdir / "relay.log"))
        gateway, grpc_port, gateway_pid = es.enter_context(joulegate(workdir, sim))
        urls = {"sim": sim, "relay": relay, "joulegate": gateway}
        pids = {"relay": relay_pid, "joulegate": gateway_pid}
        if litellm:
            port = free_port()
            cmd = [litellm, "--model", "openai/sim", "--api_base", f"{sim}/v1", "--port", str(port)]
            env = {"LITELLM_MASTER_KEY": LITELLM_KEY, "OPENAI_API_KEY": "sk-unused"}  # the sim ignores it
            urls["litellm"], pids["litellm"] = es.enter_context(process(cmd, port, workdir / "litellm.log", env))
        yield urls, grpc_port, pids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer levels and requests (a few minutes)")
    ap.add_argument("--levels", default=None, help="concurrency levels (default 1,16,64,256; --quick 1,16,64)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--paced-time-scale", default="0.05", help="the paced mode's simulator time scale")
    ap.add_argument("--litellm", default=shutil.which("litellm"), help="the LiteLLM proxy's executable (optional)")
    ap.add_argument(
        "--keep-running", action="store_true", help="do not stop the servers a route does not use (for an A/B)"
    )
    args = ap.parse_args()
    levels = [int(x) for x in (args.levels or ("1,16,64" if args.quick else "1,16,64,256")).split(",")]
    if not args.litellm:
        print("LiteLLM: not installed (its row is skipped; pass --litellm PATH to a venv's `litellm`)")

    results = {}
    for mode, scale in (("time scale 0", "0"), ("paced", args.paced_time_scale)):
        print(f"=== {mode}", flush=True)
        with (
            tempfile.TemporaryDirectory() as tmp,
            stack(Path(tmp), scale, args.litellm) as (urls, grpc_port, pids),
            only_running({} if args.keep_running else pids) as run_only,
        ):
            mode_levels = levels if scale == "0" else [c for c in levels if c <= 64]
            results[mode] = asyncio.run(
                measure(urls, grpc_port, mode_levels, args.rounds, args.quick, args.new_tokens, run_only)
            )

    fast = results["time scale 0"]
    one, c16 = fast[min(levels)], fast.get(16, fast[min(levels)])
    added_p50 = max(one[r]["added_p50"] for r in JOULEGATE_HTTP)
    added_p99 = max(one[r]["added_p99"] for r in JOULEGATE_HTTP)
    floor_p50 = max(one[r]["added_p50"] for r in ("relay-tgi", "relay-openai"))
    p99_c16 = max(c16[r]["added_p99"] for r in JOULEGATE_HTTP)
    best = {r: max(row[r]["tps"] for row in fast.values()) for r in (*JOULEGATE_HTTP, "relay-tgi", "relay-openai")}
    proxy_tps = min(best[r] for r in JOULEGATE_HTTP)
    # each HTTP route against the relay on the same route (the OpenAI one is slower at the backend itself), the
    # worst; and, as this line said before, the worst route against the relay's TGI route
    tokens_ratio = min(best[r] / best[BASELINE[r].replace("direct", "relay")] for r in JOULEGATE_HTTP)
    print(
        f"RESULT added_p50_ms={added_p50:.2f} added_p99_ms={added_p99:.2f} floor_added_p50_ms={floor_p50:.2f} "
        f"p50_ratio_to_floor={added_p50 / floor_p50:.2f} p99_c16_ms={p99_c16:.2f} proxy_tokens_per_s={proxy_tps:.0f} "
        f"tokens_ratio_to_floor={tokens_ratio:.2f} tokens_ratio_to_tgi_floor={proxy_tps / best['relay-tgi']:.2f} "
        f"grpc_added_p50_ms={one['joulegate-grpc']['added_p50']:.2f}"
    )


if __name__ == "__main__":
    main()
