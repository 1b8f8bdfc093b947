"""Start the reference backend, drive it over HTTP, and check and time what the gateway will rely on.

    python -m bench.gpu.reference_bench --out /tmp/ref                       # the 8B model on cuda
    python -m bench.gpu.reference_bench --out /tmp/ref --tiny --concurrency 1,4   # a tiny model on the CPU

Steps, each against the server started as a subprocess (``python -m bench.gpu.reference_backend``):

1. ``/health`` and ``/info`` (the limits given on its command line).
2. Warm-up: one request (not counted).
3. For each concurrency c: c streaming requests sent together, each with its own ``--prompt-tokens`` prompt (no
   shared prefix) and ``--new-tokens`` new tokens. Checks every stream: indices 1..n in order, exactly n tokens,
   a final event whose ``generated_text`` is the concatenated token texts and whose details say ``length``, n and
   ``input_length`` = the prompt's tokens by ``/tokenize``. Times TTFT (request sent -> first token event at the
   client), per-request decode rate, aggregate tokens/s, and, where pynvml finds a GPU, the energy counter's joules
   over the round (idle gaps included) per request.
4. Cancellation: a stream of many tokens is closed after a few; the engine must drop it (``/reference/stats``:
   nothing active, no handler waiting) and stop producing outputs.
5. Overload: ``max_concurrent_requests + 8`` short ``/generate`` requests at once: the 8 past the limit get 429
   "Model is overloaded" at once, the rest 200.

Writes ``reference_bench.json`` and ``server.log`` under ``--out``, prints a table and one line
``RESULT ttft_ms_c1=… ttft_p50_ms_cN=… tok_s_cN=… j_per_request_cN=… cancel_idle_ms=… overloaded=…/… checks=ok|FAILED``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench.gpu.reference_tokenizer import WordTokenizer


@dataclass(slots=True)
class StreamResult:
    """One streamed request as the client saw it."""

    sent_s: float
    first_token_s: float | None = None
    end_s: float | None = None
    tokens: int = 0
    indices_ok: bool = True
    final: dict[str, Any] | None = None
    error: str | None = None
    texts: list[str] = field(default_factory=list)

    @property
    def ttft_ms(self) -> float:
        assert self.first_token_s is not None
        return (self.first_token_s - self.sent_s) * 1000

    @property
    def decode_tok_s(self) -> float:
        assert self.first_token_s is not None and self.end_s is not None
        span = self.end_s - self.first_token_s
        return (self.tokens - 1) / span if span > 0 else float("nan")


@dataclass(frozen=True, slots=True)
class RoundResult:
    """One concurrency level."""

    concurrency: int
    wall_s: float
    ttft_ms_p50: float
    ttft_ms_max: float
    decode_tok_s_per_request: float
    tok_s: float
    energy_j: float | None
    j_per_request: float | None
    checks_ok: bool
    problems: list[str]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EnergyCounter:
    """NVML's total-energy counter of GPU 0 (mJ), or nothing where there is no GPU or pynvml."""

    def __init__(self) -> None:
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = pynvml.nvmlDeviceGetTotalEnergyConsumption
            self.name = str(pynvml.nvmlDeviceGetName(self._handle))
        except Exception:  # no pynvml, no driver, no GPU: energy is simply not reported
            self._handle = None
            self.name = None

    def read_mj(self) -> int | None:
        return None if self._handle is None else int(self._read(self._handle))


async def stream_one(
    session: aiohttp.ClientSession, url: str, prompt: str, new_tokens: int, stop_after: int | None = None
) -> StreamResult:
    """POST /generate_stream and read it to the end (or close it after ``stop_after`` tokens)."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens, "details": True}}
    result = StreamResult(sent_s=time.perf_counter())
    async with session.post(f"{url}/generate_stream", json=body) as resp:
        if resp.status != 200:
            result.error = f"HTTP {resp.status}: {await resp.text()}"
            return result
        buffer = b""
        async for chunk in resp.content.iter_any():
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                if not event.startswith(b"data:"):
                    continue  # keep-alive comment
                doc = json.loads(event[5:])
                if "error" in doc:
                    result.error = f"{doc.get('error_type')}: {doc['error']}"
                    return result
                now = time.perf_counter()
                if result.first_token_s is None:
                    result.first_token_s = now
                result.tokens += 1
                result.indices_ok &= doc["index"] == result.tokens
                result.texts.append(doc["token"]["text"] if not doc["token"]["special"] else "")
                if doc["details"] is not None or doc["generated_text"] is not None:
                    result.final = doc
                    result.end_s = now
                if stop_after is not None and result.tokens >= stop_after:
                    result.end_s = now
                    return result  # leaving the block closes the connection
    if result.end_s is None:
        result.end_s = time.perf_counter()
    return result


def check_stream(r: StreamResult, new_tokens: int, input_length: int) -> list[str]:
    problems = []
    if r.error is not None:
        return [r.error]
    if r.tokens != new_tokens:
        problems.append(f"{r.tokens} tokens, expected {new_tokens}")
    if not r.indices_ok:
        problems.append("stream indices not 1..n")
    final = r.final or {}
    details = final.get("details") or {}
    if final.get("generated_text") != "".join(r.texts):
        problems.append("generated_text is not the concatenated token texts")
    expected = {"finish_reason": "length", "generated_tokens": new_tokens, "input_length": input_length}
    got = {k: details.get(k) for k in expected}
    if got != expected:
        problems.append(f"details {got} != {expected}")
    return problems


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        resp.raise_for_status()
        return await resp.json()


async def run_round(
    session: aiohttp.ClientSession,
    url: str,
    tokenizer: WordTokenizer,
    concurrency: int,
    prompt_tokens: int,
    new_tokens: int,
    salt: int,
    energy: EnergyCounter,
) -> RoundResult:
    prompts = [tokenizer.prompt(prompt_tokens, salt + i) for i in range(concurrency)]
    e0 = energy.read_mj()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(stream_one(session, url, p, new_tokens) for p in prompts))
    wall_s = time.perf_counter() - t0
    e1 = energy.read_mj()
    problems: list[str] = []
    for i, r in enumerate(results):
        problems += [f"request {i}: {p}" for p in check_stream(r, new_tokens, prompt_tokens)]
    ok = [r for r in results if r.first_token_s is not None and r.end_s is not None]
    ttfts = [r.ttft_ms for r in ok] or [float("nan")]
    energy_j = None if e0 is None or e1 is None else (e1 - e0) / 1000
    return RoundResult(
        concurrency=concurrency,
        wall_s=wall_s,
        ttft_ms_p50=statistics.median(ttfts),
        ttft_ms_max=max(ttfts),
        decode_tok_s_per_request=statistics.median([r.decode_tok_s for r in ok] or [float("nan")]),
        tok_s=sum(r.tokens for r in results) / wall_s,
        energy_j=energy_j,
        j_per_request=None if energy_j is None else energy_j / concurrency,
        checks_ok=not problems,
        problems=problems[:10],
    )


async def check_cancellation(session: aiohttp.ClientSession, url: str, prompt: str, new_tokens: int) -> dict[str, Any]:
    """Close a long stream after 4 tokens; the engine must drop the request and go quiet."""
    before = await get_json(session, f"{url}/reference/stats")
    r = await stream_one(session, url, prompt, new_tokens, stop_after=4)
    closed_s = time.perf_counter()
    idle_ms = None
    stats = before
    while time.perf_counter() - closed_s < 10:
        stats = await get_json(session, f"{url}/reference/stats")
        engine = stats["engine"]
        if engine["engine_active"] == 0 and engine["waiting_for_output"] == 0 and stats["in_flight"] == 0:
            idle_ms = (time.perf_counter() - closed_s) * 1000
            break
        await asyncio.sleep(0.01)
    outputs_then = stats["engine"]["outputs"]
    await asyncio.sleep(0.5)
    after = await get_json(session, f"{url}/reference/stats")
    ok = (
        r.tokens == 4
        and idle_ms is not None
        and after["engine"]["outputs"] == outputs_then
        and after["engine"]["cancelled"] == before["engine"]["cancelled"] + 1
        and after["requests"]["dropped"] == before["requests"]["dropped"] + 1
    )
    return {
        "ok": ok,
        "tokens_read": r.tokens,
        "asked_tokens": new_tokens,
        "idle_ms": idle_ms,
        "outputs_after_cancel": after["engine"]["outputs_after_cancel"] - before["engine"]["outputs_after_cancel"],
        "engine_cancelled": after["engine"]["cancelled"] - before["engine"]["cancelled"],
        "dropped": after["requests"]["dropped"] - before["requests"]["dropped"],
    }


async def check_overload(
    session: aiohttp.ClientSession, url: str, tokenizer: WordTokenizer, limit: int
) -> dict[str, Any]:
    """``limit + 8`` short requests at once: exactly 8 answered 429 'Model is overloaded'."""

    async def one(i: int) -> tuple[int, Any]:
        body = {"inputs": tokenizer.prompt(8, 10_000 + i), "parameters": {"max_new_tokens": 32}}
        async with session.post(f"{url}/generate", json=body) as resp:
            return resp.status, await resp.json()

    answers = await asyncio.gather(*(one(i) for i in range(limit + 8)))
    statuses = [s for s, _ in answers]
    overloaded = [b for s, b in answers if s == 429]
    ok = (
        statuses.count(429) == 8
        and statuses.count(200) == limit
        and all(b == {"error": "Model is overloaded", "error_type": "overloaded"} for b in overloaded)
    )
    return {"ok": ok, "sent": len(answers), "status_200": statuses.count(200), "status_429": statuses.count(429)}


async def drive(args: argparse.Namespace, url: str, out: Path) -> dict[str, Any]:
    energy = EnergyCounter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        async with session.get(f"{url}/health") as resp:
            health = resp.status
        info = await get_json(session, f"{url}/info")
        tokenizer = WordTokenizer(int((await get_json(session, f"{url}/reference/stats"))["vocab_size"]))
        probe = tokenizer.prompt(args.prompt_tokens, 0)
        async with session.post(f"{url}/tokenize", json={"inputs": probe}) as resp:
            tokenized = len(await resp.json())
        warm = await stream_one(session, url, tokenizer.prompt(args.prompt_tokens, 99_999), 8)
        rounds = []
        salt = 1
        for c in args.concurrency:
            rounds.append(
                await run_round(session, url, tokenizer, c, args.prompt_tokens, args.new_tokens, salt, energy)
            )
            salt += c
        long_tokens = info["max_total_tokens"] - args.prompt_tokens
        cancel = await check_cancellation(session, url, tokenizer.prompt(args.prompt_tokens, 77_777), long_tokens)
        overload = await check_overload(session, url, tokenizer, info["max_concurrent_requests"])
        stats = await get_json(session, f"{url}/reference/stats")
    info_ok = (
        health == 200
        and info["max_concurrent_requests"] == args.max_concurrent_requests
        and info["max_total_tokens"] == args.max_total_tokens
        and info["max_input_tokens"] == args.max_input_tokens
    )
    checks = {
        "info": info_ok,
        "tokenize": tokenized == args.prompt_tokens,
        "warmup": warm.error is None and warm.tokens == 8,
        "streams": all(r.checks_ok for r in rounds),
        "cancellation": cancel["ok"],
        "overload": overload["ok"],
    }
    return {
        "gpu": energy.name,
        "info": info,
        "rounds": [asdict(r) for r in rounds],
        "cancellation": cancel,
        "overload": overload,
        "final_stats": stats,
        "checks": checks,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _round_names(concurrencies: list[int]) -> list[str]:
    """``c8``, and ``c8_2``, ``c8_3`` for repeats of the same concurrency."""
    seen: dict[int, int] = {}
    names = []
    for c in concurrencies:
        seen[c] = seen.get(c, 0) + 1
        names.append(f"c{c}" if seen[c] == 1 else f"c{c}_{seen[c]}")
    return names


def report(doc: dict[str, Any], ready: dict[str, Any]) -> str:
    lines = [
        f"model {ready['model_id']} ({ready['parameters'] / 1e9:.2f} B parameters), built in {ready['build_s']} s, "
        f"manager started in {ready['start_s']} s; gpu {doc['gpu'] or '-'}",
        f"{'conc':>4} {'wall s':>7} {'TTFT p50 ms':>11} {'TTFT max ms':>11} {'tok/s/req':>9} {'tok/s':>8} "
        f"{'J':>8} {'J/req':>7} checks",
    ]
    for r in doc["rounds"]:
        lines.append(
            f"{r['concurrency']:>4} {r['wall_s']:>7.2f} {r['ttft_ms_p50']:>11.1f} {r['ttft_ms_max']:>11.1f} "
            f"{r['decode_tok_s_per_request']:>9.1f} {r['tok_s']:>8.1f} {_fmt(r['energy_j']):>8} "
            f"{_fmt(r['j_per_request']):>7} {'ok' if r['checks_ok'] else r['problems']}"
        )
    c, o = doc["cancellation"], doc["overload"]
    lines.append(
        f"cancel: read {c['tokens_read']} of {c['asked_tokens']} tokens, engine idle {_fmt(c['idle_ms'])} ms after "
        f"close, {c['outputs_after_cancel']} step output(s) swallowed after cancel; ok={c['ok']}"
    )
    lines.append(f"overload: {o['sent']} sent, {o['status_200']} x 200, {o['status_429']} x 429; ok={o['ok']}")
    lines.append(f"checks: {doc['checks']}")
    names = _round_names([r["concurrency"] for r in doc["rounds"]])
    parts = []
    for r, name in zip(doc["rounds"], names, strict=True):
        key = "ttft_ms" if r["concurrency"] == 1 else "ttft_p50_ms"
        parts.append(f"{key}_{name}={r['ttft_ms_p50']:.1f}")
    parts += [f"tok_s_{name}={r['tok_s']:.1f}" for r, name in zip(doc["rounds"], names, strict=True)]
    parts += [f"j_per_request_{name}={_fmt(r['j_per_request'])}" for r, name in zip(doc["rounds"], names, strict=True)]
    parts.append(f"cancel_idle_ms={_fmt(c['idle_ms'])}")
    parts.append(f"overloaded={o['status_429']}/{o['sent']}")
    parts.append(f"checks={'ok' if all(doc['checks'].values()) else 'FAILED'}")
    lines.append("RESULT " + " ".join(parts))
    return "\n".join(lines)


def _copy(source: IO[bytes], sink: IO[bytes]) -> None:
    for line in source:
        sink.write(line)
        sink.flush()


def start_server(args: argparse.Namespace, port: int, log_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "bench.gpu.reference_backend",
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-concurrent-requests",
        str(args.max_concurrent_requests),
        "--max-input-tokens",
        str(args.max_input_tokens),
        "--max-total-tokens",
        str(args.max_total_tokens),
    ]
    if args.tiny:
        cmd.append("--tiny")
    cmd += args.server_arg
    log_file = log_path.open("wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    deadline = time.monotonic() + args.start_timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        log_file.write(line)
        log_file.flush()
        if line.startswith(b"READY "):
            # keep draining the server's stdout (its logs), or it blocks once the pipe is full
            threading.Thread(target=_copy, args=(proc.stdout, log_file), daemon=True).start()
            return proc, json.loads(line[6:])
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log_path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu.reference_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-concurrent-requests", type=int, default=128)
    parser.add_argument("--max-input-tokens", type=int, default=1024)
    parser.add_argument("--max-total-tokens", type=int, default=2048)
    parser.add_argument("--start-timeout-s", type=float, default=300)
    parser.add_argument("--server-arg", action="append", default=[], help="extra server flag (repeatable)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    proc, ready = start_server(args, port, args.out / "server.log")
    try:
        doc = asyncio.run(drive(args, f"http://127.0.0.1:{port}", args.out))
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
    doc["ready"] = ready
    (args.out / "reference_bench.json").write_text(json.dumps(doc, indent=2))
    print(report(doc, ready), flush=True)
    return 0 if all(doc["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
