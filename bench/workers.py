"""Tokens/s through ``joulegate serve --workers N`` against N: does a host's second core serve more?

One simulated TGI (``joulegate sim-tgi --time-scale 0``: every step instantaneous, so what remains is the
transport, the simulator's own work and the gateway's), one fresh PostgreSQL database (``--workers`` > 1 needs
it; the one-worker runs use it too, so that only the number of workers differs), ``--meter none`` (the meter runs
once per host whatever N is, and it is not on the request path). The load: ``--concurrency`` streaming
``/generate_stream`` calls of ``--tokens`` tokens over as many keep-alive connections, which the kernel hands to
the workers (``SO_REUSEPORT``); the client counts tokens by scanning the bytes for ``data:``. Each worker count runs
``--rounds`` times, interleaved (1, 2, then 2, 1, ...); figures are medians over the rounds. Each run also reports
the CPU the gateway's processes, the simulator and this client used (cores: CPU seconds / wall seconds), and how
the requests split between the workers (from each worker's own ``/metrics``); ``box`` is every process on the
machine (``/proc/stat``), so what is left of it beyond ours was other work on a shared machine.

What the figure means on a small box: the simulator at time scale 0 and the load generator are Python processes
too and compete for the same cores, so the ratio says how much a second worker gains *on this machine with its
load generator and backend beside it*; on a host whose cores are the gateway's (the backend on GPUs, clients
elsewhere) the gain is bounded by cores, not by this figure. The CPU columns show where the cores went.

Ends with ``RESULT tokens_per_s_w1=… tokens_per_s_w2=… ratio=…`` (ratio = w2 / w1, or the largest N against 1).

    python -m bench.workers [--quick] [--workers 1,2] [--rounds 3] [--seconds 8] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from bench._cpu import box_busy_s, cpu_s, tree
from bench._procs import POSTGRES_ADMIN_URL, free_port, postgres_database

PROMPT = "Explain in one paragraph why batching requests saves energy on a GPU serving a language model."


def _wait_http(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer")


def _free_run(n: int) -> int:
    """A free port whose next ``n - 1`` ports are free too (worker i's /metrics listens on base + i)."""
    for _ in range(100):
        base = free_port()
        try:
            for i in range(1, n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {n} consecutive free ports")


def _free_outside(base: int, n: int) -> int:
    while (port := free_port()) in range(base, base + n):
        pass
    return port


@dataclass
class Result:
    workers: int
    tokens_per_s: float
    requests_per_s: float
    p50_ms: float
    gateway_cores: float
    sim_cores: float
    client_cores: float
    box_cores: float  # every process on the machine, ours and others'
    split: list[int]  # requests per worker

    @property
    def per_core(self) -> float:
        return self.tokens_per_s / self.gateway_cores if self.gateway_cores else float("nan")


async def _load(base: str, concurrency: int, tokens: int, seconds: float) -> tuple[int, list[float], float]:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": tokens}}
    stop_at = 0.0
    counted = 0
    latencies: list[float] = []
    measuring = False

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal counted
        while time.perf_counter() < stop_at or not measuring:
            t0 = time.perf_counter()
            n = 0
            async with http.post(f"{base}/generate_stream", json=body) as resp:
                assert resp.status == 200, resp.status
                async for chunk in resp.content.iter_any():
                    n += chunk.count(b"data:")
            if measuring:
                counted += n
                latencies.append((time.perf_counter() - t0) * 1000)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        stop_at = time.perf_counter() + 3600
        tasks = [asyncio.create_task(client(http)) for _ in range(concurrency)]
        await asyncio.sleep(1.0)  # warm: connections open, pools filled
        measuring = True
        counted = 0
        t0 = time.perf_counter()
        stop_at = t0 + seconds
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    return counted, latencies, wall


def _split(base_port: int, workers: int) -> list[int]:
    out = []
    for i in range(workers):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{base_port + i}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            out.append(-1)
            continue
        n = sum(
            float(m.group(1))
            for m in re.finditer(
                r'joulegate_http_requests_total\{code="200",[^}]*route="/generate_stream"\} (\S+)', text
            )
        )
        out.append(int(n))
    return out


def run_one(workdir: Path, db_url: str, sim_url: str, sim_pid: int, workers: int, args: argparse.Namespace) -> Result:
    metrics_port = _free_run(workers)
    http_port, grpc_port = _free_outside(metrics_port, workers), _free_outside(metrics_port, workers)
    env = {
        **os.environ,
        "JOULEGATE_AUTH__REQUIRED": "false",
        "JOULEGATE_METER__JOURNAL_PATH": str(workdir / f"journal-w{workers}.jsonl"),
        "JOULEGATE_SERVER__LOG_LEVEL": "warning",
        "JOULEGATE_SERVER__REQUEST_LOG": "off",
        "JOULEGATE_SERVER__WORKER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
    }
    cmd = [
        sys.executable,
        *("-m", "app.cli", "serve", "--workers", str(workers), "--meter", "none", "--db", db_url),
        *("--backend", sim_url, "--http-listen", f"127.0.0.1:{http_port}", "--grpc-listen", f"127.0.0.1:{grpc_port}"),
    ]
    if workers == 1:  # the single process serves no per-worker /metrics: read the shared one
        metrics_port = http_port
    with open(workdir / f"gateway-w{workers}.log", "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_http(f"http://127.0.0.1:{http_port}/health")
        if workers > 1:  # every worker up before the load opens its connections
            for i in range(workers):
                _wait_http(f"http://127.0.0.1:{metrics_port + i}/metrics")
        gateway = tree(proc.pid)
        cpu0 = (cpu_s(gateway), cpu_s([sim_pid]), sum(os.times()[:2]), box_busy_s())
        t0 = time.perf_counter()
        tokens, lat, wall = asyncio.run(
            _load(f"http://127.0.0.1:{http_port}", args.concurrency, args.tokens, args.seconds)
        )
        elapsed = time.perf_counter() - t0  # CPU is read over warm-up + measurement
        cpu1 = (cpu_s(gateway), cpu_s([sim_pid]), sum(os.times()[:2]), box_busy_s())
        split = _split(metrics_port, workers)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    cores = [(b - a) / elapsed for a, b in zip(cpu0, cpu1, strict=True)]
    return Result(
        workers,
        tokens / wall,
        len(lat) / wall,
        statistics.median(lat) if lat else float("nan"),
        *cores,
        split,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--workers", default="1,2", help="worker counts to compare (comma-separated; the first is the base)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per run")
    ap.add_argument("--concurrency", type=int, default=64, help="streams (and connections) at once")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 4 s")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 4.0
    counts = [int(w) for w in args.workers.split(",")]
    results: dict[int, list[Result]] = {w: [] for w in counts}
    with (
        tempfile.TemporaryDirectory(prefix="jg-bench-workers-") as tmp,
        postgres_database(POSTGRES_ADMIN_URL, "jg_bench_workers") as db_url,
    ):
        workdir = Path(tmp)
        sim_port = free_port()
        sim = subprocess.Popen(
            [
                *(sys.executable, "-m", "app.cli", "sim-tgi", "--port", str(sim_port)),
                *("--time-scale", "0", "--max-concurrent-requests", "4096"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sim_url = f"http://127.0.0.1:{sim_port}"
        try:
            _wait_http(sim_url + "/health")
            for r in range(args.rounds):
                order = counts if r % 2 == 0 else counts[::-1]
                for w in order:
                    res = run_one(workdir, db_url, sim_url, sim.pid, w, args)
                    results[w].append(res)
                    print(
                        f"round {r + 1} workers={w}: {res.tokens_per_s:8.0f} tok/s {res.requests_per_s:6.0f} req/s "
                        f"p50 {res.p50_ms:6.1f} ms | cores: gateway {res.gateway_cores:.2f} sim {res.sim_cores:.2f} "
                        f"client {res.client_cores:.2f} box {res.box_cores:.2f} | requests per worker {res.split}",
                        flush=True,
                    )
        finally:
            sim.terminate()
            sim.wait(10)
    print(f"\n{os.cpu_count()} cores; {args.concurrency} streams of {args.tokens} tokens, time scale 0; medians of "
          f"{args.rounds} rounds")  # fmt: skip
    print("workers  tok/s    req/s  p50_ms  gateway_cores  tok/s_per_gateway_core  sim_cores  client_cores  box_cores")
    med: dict[int, float] = {}
    for w in counts:
        rs = results[w]

        def m(attr: str, rs: list[Result] = rs) -> float:
            return statistics.median(getattr(r, attr) for r in rs)

        med[w] = m("tokens_per_s")
        print(
            f"{w:7d}  {med[w]:7.0f}  {m('requests_per_s'):6.0f}  {m('p50_ms'):6.1f}  {m('gateway_cores'):13.2f}  "
            f"{m('per_core'):22.0f}  {m('sim_cores'):9.2f}  {m('client_cores'):12.2f}  {m('box_cores'):9.2f}"
        )
    base, top = counts[0], counts[-1]
    fields = " ".join(f"tokens_per_s_w{w}={med[w]:.0f}" for w in counts)
    print(f"RESULT {fields} ratio={med[top] / med[base]:.2f}")


if __name__ == "__main__":
    main()
