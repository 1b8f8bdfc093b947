"""How fast the simulator streams when steps take no time: ``python -m sim.throughput``.

The proxy-overhead benchmark runs the simulator at ``time_scale=0`` so that only the gateway's cost is measured;
that only works if the simulator itself is far faster than the gateway. This starts ``joulegate sim-tgi`` in its
own process, drives ``/generate_stream`` from this one with a lean HTTP/1.1 client (raw asyncio streams, keep-alive
connections), checks every stream ends with its final event, and reports streamed tokens per second, both per wall
second and per CPU second of the simulator process (the figure that does not depend on what else the machine runs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import IO


@dataclass(frozen=True, slots=True)
class ThroughputResult:
    concurrency: int
    tokens_per_request: int
    requests: int
    tokens: int
    wall_s: float
    sim_cpu_s: float | None  # CPU time the simulator process used meanwhile (Linux /proc), None if unknown

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def tokens_per_cpu_s(self) -> float | None:
        return None if not self.sim_cpu_s else self.tokens / self.sim_cpu_s

    def describe(self) -> str:
        per_cpu = self.tokens_per_cpu_s
        cpu = f", {per_cpu:,.0f} tokens per simulator CPU second" if per_cpu else ""
        return (
            f"{self.concurrency} streams x {self.tokens_per_request} tokens: {self.requests} requests, "
            f"{self.tokens:,} tokens in {self.wall_s:.2f} s = {self.tokens_per_s:,.0f} tokens/s{cpu}"
        )


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (Linux), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    host: str,
    port: int,
    concurrency: int = 32,
    tokens_per_request: int = 256,
    duration_s: float = 5.0,
    sim_pid: int | None = None,
) -> ThroughputResult:
    """Keep ``concurrency`` streams going for ``duration_s``; count the tokens that came back."""
    body = json.dumps({"inputs": "Measure the simulator", "parameters": {"max_new_tokens": tokens_per_request}})
    request = (
        f"POST /generate_stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    totals = {"tokens": 0, "requests": 0}

    async def worker(deadline: float) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while time.perf_counter() < deadline:
                writer.write(request)
                buf = bytearray()
                while not buf.endswith(b"\r\n0\r\n\r\n"):  # the end of a chunked body
                    chunk = await reader.read(1 << 18)
                    if not chunk:
                        raise ConnectionError("the simulator closed the connection")
                    buf += chunk
                tokens = buf.count(b'data:{"index"')
                last_event = bytes(buf[buf.rfind(b"data:") :])
                if tokens != tokens_per_request or b'"generated_text":"' not in last_event:
                    raise AssertionError(f"a stream ended early or without its final event: {last_event[:300]!r}")
                totals["tokens"] += tokens
                totals["requests"] += 1
        finally:
            writer.close()

    cpu0 = process_cpu_s(sim_pid) if sim_pid else None
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(t0 + duration_s) for _ in range(concurrency)))
    wall_s = time.perf_counter() - t0
    cpu1 = process_cpu_s(sim_pid) if sim_pid else None
    return ThroughputResult(
        concurrency=concurrency,
        tokens_per_request=tokens_per_request,
        requests=totals["requests"],
        tokens=totals["tokens"],
        wall_s=wall_s,
        sim_cpu_s=None if cpu0 is None or cpu1 is None else cpu1 - cpu0,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SimProcess:
    """``joulegate sim-tgi`` in a child process (time_scale 0 unless told otherwise), ready when entered."""

    def __init__(self, *extra_args: str, port: int | None = None) -> None:
        self.port = port or free_port()
        self.args = [sys.executable, "-m", "app.cli", "sim-tgi", "--port", str(self.port), "--time-scale", "0"]
        self.args += list(extra_args)
        self.proc: subprocess.Popen[str] | None = None
        self.output: deque[str] = deque(maxlen=200)

    def __enter__(self) -> SimProcess:
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        stdout = self.proc.stdout
        assert stdout is not None
        for line in stdout:
            self.output.append(line)
            if "listening on" in line:
                # keep draining its output, or a chatty child would block on a full pipe
                threading.Thread(target=self._drain, args=(stdout,), daemon=True).start()
                return self
        self.__exit__()
        raise RuntimeError(f"sim-tgi did not start: {''.join(self.output)[-2000:]}")

    def _drain(self, stdout: IO[str]) -> None:
        for line in stdout:
            self.output.append(line)

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--tokens", type=int, default=256, help="max_new_tokens per request")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    args = parser.parse_args(argv)
    with SimProcess() as sim:
        assert sim.proc is not None
        for concurrency in args.concurrency:
            result = asyncio.run(measure("127.0.0.1", sim.port, concurrency, args.tokens, args.seconds, sim.proc.pid))
            print(result.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
